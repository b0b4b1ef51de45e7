"""Rotary position embedding (RoPE) of cached keys, undone before compression and redone after.

Llama-like models cache keys after RoPE (Su et al., 2021, *RoFormer*, arXiv:2104.09864): the key
of a token at position ``p`` is ``k' = a (k ⊙ cos(p θ) + rot(k) ⊙ sin(p θ))``, with
``θ = (θ_0 … θ_{d/2-1}, θ_0 … θ_{d/2-1})`` the model's inverse frequencies, ``a`` its attention
scaling and ``rot(k) = (−k_{d/2:}, k_{:d/2})``. The rotation turns each channel pair at its own
frequency along the tokens, so that a channel of the cached keys oscillates within a
quantization group of tokens. KVQuant (Hooper et al., 2024, arXiv:2401.18079) quantizes keys
before RoPE instead, where a channel keeps its scale along the tokens; with
``GEARConfig(key_rope="pre")``, and by default (``"auto"``) for models whose RoPE is supported,
the cache does the same: it undoes the rotation,
``k = (k' ⊙ cos + rot(k') ⊙ sin*) / a`` with ``sin* = −sin``, compresses ``k``, and rotates the
decompressed keys back to their positions when it reads them.

[`KeyRotation`][sketchcomm.gear.rope.KeyRotation] reads ``θ`` and ``a`` from a model config with
transformers' own RoPE parameter functions; rope types whose frequencies change with the
sequence length (``dynamic``, ``longrope``) and partial rotary embeddings are refused.
"""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .config import GEARConfig

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
"""Rope types whose frequencies do not depend on the sequence length."""


class KeyRotation:
    """A model's RoPE, to undo and redo on cached keys ``[batch, kv_heads, tokens, head_dim]``.

    Args:
        inv_freq: ``[head_dim / 2]`` inverse frequencies ``θ``.
        scaling: the attention scaling ``a`` applied to ``cos`` and ``sin``.

    ``cos`` and ``sin`` are kept in a float32 table, extended as positions grow, so that reading a
    block's rotation is a lookup.

    >>> import torch
    >>> rotation = KeyRotation(torch.tensor([1.0, 0.1]))
    >>> keys = torch.randn(2, 1, 5, 4)  # keys before RoPE of tokens 3..7, row 0 padded by 3
    >>> cached = rotation.rotate(keys, first=3, padding=torch.tensor([3, 0]))
    >>> bool(torch.allclose(cached[0, :, 0], keys[0, :, 0]))  # row 0's token 3 is at position 0
    True
    >>> bool(torch.allclose(rotation.unrotate(cached, 3, torch.tensor([3, 0])), keys, atol=1e-6))
    True
    """

    def __init__(self, inv_freq: torch.Tensor, scaling: float = 1.0):
        if inv_freq.dim() != 1 or inv_freq.numel() == 0:
            raise ValueError(f"inv_freq must be a non-empty vector, got {tuple(inv_freq.shape)}")
        if not scaling > 0:
            raise ValueError(f"scaling must be positive, got {scaling}")
        self.inv_freq = inv_freq.detach().float().cpu()
        self.scaling = float(scaling)
        self.head_dim = 2 * inv_freq.numel()
        self._cos = self._sin = torch.empty(0, self.head_dim)

    @classmethod
    def from_config(cls, config) -> KeyRotation:
        """The RoPE of a transformers model config (its text config for multimodal models).

        Raises:
            ValueError: the config has no rotary embedding, a partial one, or a rope type whose
                frequencies change with the sequence length.
        """
        text = config.get_text_config(decoder=True)
        parameters = getattr(text, "rope_parameters", None) or {}
        rope_type = parameters.get("rope_type")
        if rope_type is None or "rope_theta" not in parameters:
            raise ValueError(
                "key_rope='pre' needs a model with rotary position embeddings "
                "(config.rope_parameters with a rope_theta); use key_rope='post'"
            )
        if rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(
                f"key_rope='pre' supports rope types {STATIC_ROPE_TYPES}, the model has "
                f"{rope_type!r} (its frequencies change with the length); use key_rope='post'"
            )
        if getattr(text, "partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                "key_rope='pre' needs a rotary embedding over the whole head dimension; "
                "use key_rope='post'"
            )
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if rope_type == "default":
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
            return cls(1.0 / parameters["rope_theta"] ** exponents)
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](text, torch.device("cpu"))
        return cls(inv_freq, scaling)

    def _table(
        self, first: int, count: int, padding: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled ``cos`` and ``sin`` of tokens ``first .. first + count - 1``, ``[rows, 1,
        count, head_dim / 2]`` (both halves of ``θ`` are equal): one row (a slice of the table)
        when every row has the same padding, else one per row; positions below 0 (padding)
        read position 0."""
        offsets = None
        if padding is not None and padding.numel():
            if bool((padding == padding[0]).all()):
                first -= int(padding[0])
            else:
                offsets = padding.to(device).long()
        needed = first + count if offsets is None else first + count - int(offsets.min())
        if needed > self._cos.shape[0]:
            size = max(needed, 2 * self._cos.shape[0], 256)
            # float32 angles, as the models compute them, so that undoing their rotation is exact
            # up to the rounding of the products.
            angles = torch.arange(size, dtype=torch.float32)[:, None] * self.inv_freq
            self._cos, self._sin = angles.cos(), angles.sin()
        if self._cos.device != device:
            self._cos, self._sin = self._cos.to(device), self._sin.to(device)
        if offsets is None and first >= 0:
            rows = slice(first, first + count)
            return self._cos[None, None, rows], self._sin[None, None, rows]
        positions = torch.arange(first, first + count, device=device)[None, :]
        if offsets is not None:
            positions = positions - offsets[:, None]
        positions = positions.clamp_min(0)
        return self._cos[positions][:, None], self._sin[positions][:, None]

    def _turn_(
        self, keys: torch.Tensor, first: int, padding: torch.Tensor | None, direction: float
    ) -> torch.Tensor:
        """Rotate ``keys`` in place by ``direction`` (``+1``: apply RoPE, ``-1``: undo it)."""
        if keys.shape[-1] != self.head_dim:
            raise ValueError(f"keys have head_dim {keys.shape[-1]}, the RoPE {self.head_dim}")
        cos, sin = self._table(first, keys.shape[-2], padding, keys.device)
        half = self.head_dim // 2
        low, high = keys[..., :half], keys[..., half:]
        saved = low.clone()
        # (low, high) -> (low cos - high sin, high cos + low sin), sin negated to undo.
        low.mul_(cos).addcmul_(high, sin, value=-direction)
        high.mul_(cos).addcmul_(saved, sin, value=direction)
        if self.scaling != 1.0:
            keys.mul_(self.scaling if direction > 0 else 1.0 / self.scaling)
        return keys

    def rotate_(
        self, keys: torch.Tensor, first: int = 0, padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Keys before RoPE → the model's cached keys, in place (in the keys' dtype); returns
        ``keys``. Keys ``[batch, kv_heads, tokens, head_dim]`` hold the tokens ``first,
        first + 1, …`` of the sequence; with ``padding`` (``[batch]`` left-padding positions)
        token ``i`` of row ``b`` is at position ``i - padding[b]`` (the positions ``generate``
        gives left-padded rows; padding itself reads position 0), else at position ``i``."""
        return self._turn_(keys, first, padding, 1.0)

    def rotate(
        self, keys: torch.Tensor, first: int = 0, padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[`rotate_()`][sketchcomm.gear.rope.KeyRotation.rotate_] on a float32 copy, returned
        in the keys' dtype."""
        work = keys.to(torch.float32, copy=True)
        return self._turn_(work, first, padding, 1.0).to(keys.dtype)

    def unrotate(
        self, keys: torch.Tensor, first: int = 0, padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The model's cached keys → keys before RoPE (a float32 computation, returned in the
        keys' dtype), positions as in [`rotate_()`][sketchcomm.gear.rope.KeyRotation.rotate_]:
        the inverse of the rotation up to rounding."""
        work = keys.to(torch.float32, copy=True)
        return self._turn_(work, first, padding, -1.0).to(keys.dtype)


def rotation_for(gear_config: GEARConfig, model_config) -> KeyRotation | None:
    """The rotation to undo on the keys under ``gear_config.key_rope``: the model's RoPE for
    ``"pre"`` (a ``ValueError`` if ``model_config`` is ``None`` or its RoPE is not supported),
    and for ``"auto"`` when it is supported; ``None`` (keys compressed after RoPE) otherwise."""
    if gear_config.key_rope == "post" or (model_config is None and gear_config.key_rope == "auto"):
        return None
    if model_config is None:
        raise ValueError(
            "a GEARConfig with key_rope='pre' needs the model's config: "
            "GEARCache(gear_config, config=model.config)"
        )
    try:
        return KeyRotation.from_config(model_config)
    except ValueError:
        if gear_config.key_rope == "pre":
            raise
        return None


def check_rotation(config: GEARConfig, rotation: KeyRotation | None) -> None:
    """Raise a ``ValueError`` unless ``rotation`` agrees with ``config.key_rope`` (required for
    ``"pre"``, refused for ``"post"``, either for ``"auto"``)."""
    if config.key_rope == "pre" and rotation is None:
        raise ValueError("key_rope='pre' needs a KeyRotation (see rotation_for)")
    if config.key_rope == "post" and rotation is not None:
        raise ValueError("key_rope='post' compresses the keys after RoPE: pass no KeyRotation")
