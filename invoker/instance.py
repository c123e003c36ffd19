"""A loaded model: the module, its tokenizer and device, and how prompts become token ids.

An instance is built in one of three ways:

- :meth:`ModelInstance.from_tensors` — the cold-start path. The architecture is built on the
  ``meta`` device (no weight memory), then ``load_state_dict(..., assign=True)`` makes every
  parameter *be* the loader's tensor (a view over its buffer: no copy). Tied weights are re-tied
  and non-persistent buffers (rotary ``inv_freq``), which are not in any checkpoint and are left on
  ``meta``, are materialised on the device and recomputed by the model's own initialiser.
- :meth:`ModelInstance.from_pretrained` — a Hugging Face folder, for tests and tools.
- :meth:`ModelInstance.from_model` — an already-built module (e.g. loaded from GGUF).

Prompt encoding (:meth:`ModelInstance.encode`): a function is a chat function, so a plain
``prompt`` on a tokenizer with a chat template is sent as one user message; ``raw=True`` (or a
tokenizer without a template) encodes the text as is.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from sllm.config import MAX_PROMPT_CHARS
from sllm.errors import CheckpointError, InvalidRequest, PromptTooLong

logger = logging.getLogger(__name__)

CHAT_ROLES = frozenset({"system", "user", "assistant"})
"""Roles a message may have."""


@dataclass(frozen=True, eq=False)
class ModelInstance:
    """A model ready to generate.

    Attributes:
        model: the causal LM, in eval mode, with every parameter on ``device``.
        tokenizer: its tokenizer.
        device: where the parameters live and where inputs must go.
        context_window: the most tokens (prompt + generated) the model can attend to.
        eos_token_ids: tokens that end a generation (from the generation config, the model
            config and the tokenizer; any of them may list several).
        accepts_logits_to_keep: whether ``model.forward`` takes ``logits_to_keep`` (so a
            prefill computes the LM head for the last position only).
    """

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    device: torch.device
    context_window: int
    eos_token_ids: frozenset[int]
    accepts_logits_to_keep: bool = field(default=False)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_model(
        cls,
        model: transformers.PreTrainedModel,
        tokenizer: transformers.PreTrainedTokenizerBase,
        *,
        context_window: int | None = None,
    ) -> ModelInstance:
        """Wrap an already-built model; puts it in eval mode.

        Args:
            model: a causal LM whose parameters are all on one device.
            tokenizer: its tokenizer.
            context_window: tokens; defaults to the config's ``max_position_embeddings``.

        Raises:
            CheckpointError: the parameters span several devices, or no context window is known.
        """
        model.eval()
        devices = {p.device for p in model.parameters()}
        if len(devices) != 1:
            raise CheckpointError(f"model parameters span devices {sorted(map(str, devices))}")
        window = context_window if context_window is not None else _context_window(model, tokenizer)
        return cls(
            model=model,
            tokenizer=tokenizer,
            device=devices.pop(),
            context_window=window,
            eos_token_ids=_eos_token_ids(model, tokenizer),
            accepts_logits_to_keep="logits_to_keep" in inspect.signature(model.forward).parameters,
        )

    @classmethod
    def from_pretrained(cls, model_dir: Path, *, device: str = "cpu") -> ModelInstance:
        """Load a Hugging Face model folder (transformers copies the weights; for tests, tools)."""
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", device_map=device)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return cls.from_model(model, tokenizer)

    @classmethod
    def from_tensors(
        cls, model_dir: Path, tensors: Mapping[str, torch.Tensor], *, device: str = "cpu",
        tokenizer: transformers.PreTrainedTokenizerBase | None = None,
    ) -> ModelInstance:
        """Build the model around tensors that already hold its weights, without copying them.

        Args:
            model_dir: folder with ``config.json``, the tokenizer files and optionally
                ``generation_config.json``.
            tensors: parameter name -> tensor, already on ``device``, in the dtype the model
                should run in. A tied weight (``lm_head.weight``) may be absent, or present as
                the same tensor as its source.
            device: where the tensors are (``"cpu"``, ``"cuda:0"``, ...).
            tokenizer: the model's tokenizer when the caller already loaded it (the invoker loads
                it while the checkpoint is being read); default: loaded from ``model_dir``.

        Returns:
            An instance whose parameters are the given tensors (same storage).

        Raises:
            CheckpointError: a tensor is missing, unexpected, of the wrong shape, on another
                device, or a non-persistent buffer cannot be rebuilt.
        """
        target = _resolve_device(device)
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        tied = dict(model.all_tied_weights_keys)  # target name -> source name
        _check_tensors(model, tensors, tied, target)
        model.load_state_dict(dict(tensors), strict=False, assign=True)
        _retie(model, tensors, tied)
        _materialise_buffers(model, target)
        meta = [n for n, t in _named_tensors(model) if t.is_meta]
        if meta:
            raise CheckpointError(f"tensors still unallocated after loading: {meta[:5]}")
        if (model_dir / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(model_dir)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return cls.from_model(model, tokenizer)

    # ---- prompts --------------------------------------------------------------------------------

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """``(layers, kv_heads, head_dim)`` of the model's KV cache."""
        config = self.model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return (config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
                head_dim)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token takes (keys and values, every layer)."""
        layers, heads, head_dim = self.kv_shape
        return 2 * layers * heads * head_dim * self.model.dtype.itemsize

    def encode(
        self,
        *,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        raw: bool = False,
    ) -> list[int]:
        """Turn a prompt or a chat into the token ids the model will read.

        Exactly one of ``prompt`` and ``messages`` is given. ``messages`` goes through the chat
        template with a generation prompt. ``prompt`` is sent as one user message when the
        tokenizer has a chat template and ``raw`` is false; otherwise it is encoded as plain text
        (with the tokenizer's own special tokens, e.g. BOS).

        Returns:
            Token ids, fewer than ``context_window``.

        Raises:
            InvalidRequest: both or neither given, empty or whitespace-only prompt, empty
                messages, a message without a known role or with blank content (``param``
                names the field).
            PromptTooLong: the prompt has ``context_window`` tokens or more, or more than
                ``MAX_PROMPT_CHARS`` characters.
        """
        if (prompt is None) == (messages is None):
            raise InvalidRequest("give exactly one of 'prompt' and 'messages'", param="prompt")
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if prompt is not None:
            _check_text(prompt, "prompt")
            if raw or not has_template:
                return self._checked(self.tokenizer.encode(prompt), param="prompt")
            messages = [{"role": "user", "content": prompt}]
            param = "prompt"
        else:
            _check_messages(messages)
            param = "messages"
            if not has_template:
                raise InvalidRequest("this model has no chat template; send 'prompt'", param=param)
        assert messages is not None
        text = self.tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert isinstance(text, str)
        # The template already wrote the special tokens as text.
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self._checked(ids, param=param)

    def _checked(self, ids: list[int], *, param: str) -> list[int]:
        if not ids:
            raise InvalidRequest("the prompt encodes to no tokens", param=param)
        if len(ids) >= self.context_window:
            raise PromptTooLong(
                f"the prompt has {len(ids)} tokens; this model's context window is "
                f"{self.context_window} tokens, so the prompt must have at most "
                f"{self.context_window - 1}",
                param=param,
            )
        return list(ids)


# ---- helpers: prompt validation -----------------------------------------------------------------


def _check_text(text: object, param: str) -> None:
    if not isinstance(text, str):
        raise InvalidRequest(f"'{param}' must be a string", param=param)
    if not text.strip():
        raise InvalidRequest(f"'{param}' is empty", param=param)
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptTooLong(
            f"'{param}' has {len(text)} characters; at most {MAX_PROMPT_CHARS} are accepted",
            param=param,
        )


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    total = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}, not {role!r}",
                param=f"messages[{i}].role",
            )
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise InvalidRequest(
                f"messages[{i}].content must be a non-empty string",
                param=f"messages[{i}].content",
            )
        total += len(content)
    if total > MAX_PROMPT_CHARS:
        raise PromptTooLong(
            f"'messages' have {total} characters; at most {MAX_PROMPT_CHARS} are accepted",
            param="messages",
        )


# ---- helpers: model facts -----------------------------------------------------------------------


def _ids(value: object) -> set[int]:
    """Token ids from a config field that may be None, an int or a list of ints."""
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, Iterable):
        return {int(v) for v in value}
    return set()


def _eos_token_ids(
    model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase
) -> frozenset[int]:
    generation_config = getattr(model, "generation_config", None)
    ids = _ids(getattr(generation_config, "eos_token_id", None))
    ids |= _ids(getattr(model.config.get_text_config(), "eos_token_id", None))
    ids |= _ids(tokenizer.eos_token_id)
    return frozenset(ids)


def _context_window(
    model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase
) -> int:
    window = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if isinstance(window, int) and window > 0:
        return window
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**9:  # tokenizers use 1e30 for "unknown"
        return limit
    raise CheckpointError("the model's context window is unknown (no max_position_embeddings)")


# ---- helpers: building around given tensors -----------------------------------------------------


def _resolve_device(device: str) -> torch.device:
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    return target


def _named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def _check_tensors(
    model: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor],
    tied: Mapping[str, str],
    device: torch.device,
) -> None:
    """Raise CheckpointError unless ``tensors`` fit the model's state dict exactly."""
    expected = {name: t for name, t in model.state_dict(keep_vars=True).items()}
    missing = [
        name
        for name in expected
        if name not in tensors and not (name in tied and tied[name] in tensors)
    ]
    unexpected = [name for name in tensors if name not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the model: missing {sorted(missing)[:5]} "
            f"({len(missing)}), unexpected {sorted(unexpected)[:5]} ({len(unexpected)})"
        )
    for name, tensor in tensors.items():
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{name} has shape {tuple(tensor.shape)}, the model wants {want}")
        if tensor.device != device:
            raise CheckpointError(f"{name} is on {tensor.device}, the instance is on {device}")


def _retie(
    model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], tied: Mapping[str, str]
) -> None:
    """Make each tied target the same Parameter as its source.

    A target absent from ``tensors``, or given as the very same memory as its source, is tied; a
    target given with memory of its own is kept as given (the checkpoint untied it).
    """
    for target, source in tied.items():
        given = tensors.get(target)
        if given is not None and given.data_ptr() != tensors[source].data_ptr():
            logger.info("%s is tied to %s by the config but stored apart", target, source)
            continue
        parent_name, _, attr = target.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, model.get_parameter(source))


def _materialise_buffers(model: transformers.PreTrainedModel, device: torch.device) -> None:
    """Allocate the buffers left on ``meta`` (non-persistent ones: no checkpoint holds them) on
    ``device`` and let the model's initialiser compute them (e.g. rotary ``inv_freq``).

    They are first filled with NaN so that one the initialiser does not know is caught.

    Raises:
        CheckpointError: a buffer is not floating point, or its module's initialiser left it
            unset.
    """
    owners: dict[str, torch.nn.Module] = {}
    for module_name, module in model.named_modules():
        for buffer_name, buffer in list(module.named_buffers(recurse=False)):
            if not buffer.is_meta:
                continue
            full = f"{module_name}.{buffer_name}" if module_name else buffer_name
            if not buffer.is_floating_point():
                raise CheckpointError(f"cannot rebuild buffer {full} of dtype {buffer.dtype}")
            filled = torch.full(buffer.shape, math.nan, dtype=buffer.dtype, device=device)
            module.register_buffer(buffer_name, filled, persistent=False)
            owners[full] = module
    with torch.no_grad():
        for module in {id(m): m for m in owners.values()}.values():
            for param in module.parameters(recurse=False):
                param._is_hf_initialized = True  # loaded: the initialiser must leave it alone
            model._init_weights(module)
    for full, module in owners.items():
        value: Any = module.get_buffer(full.rpartition(".")[2])
        if torch.isnan(value).any():
            raise CheckpointError(f"non-persistent buffer {full} could not be rebuilt")
