"""LlamaBidirectionalModel: Llama with the causal mask removed in every layer (remote code of an export).

export_hf.py copies this file into every Llama export, and config.json's auto_map points at it, so

    AutoModel.from_pretrained(export_dir, trust_remote_code=True)

builds this model. It is standalone (imports torch and transformers only) and keeps the
reference's names (model_type "llama_bidirec", architecture "LlamaBidirectionalModel",
LlamaModel's parameter names), so vLLM and llama.cpp, which know that architecture, read the
same folder.

Bidirectional by construction, on every transformers 5.x: the reference's own file overrides a
transformers method that no longer exists from 4.53 on and silently runs causally. Here the
forward builds the attention mask itself with `create_bidirectional_mask` (padding masked out,
no causal triangle, whatever the attention implementation wants: a float mask for eager, a
boolean one for SDPA, the 2D one for flash-attention), and every attention module has
`is_causal = False`, because transformers' SDPA and flash wrappers fall back to the module flag
when the mask is None, i.e. when a batch has no padding. `config.is_causal = False` is set too,
for code that reads it. Pooling (mean over non-pad tokens) and normalisation are done by the
caller, e.g. sentence-transformers' Pooling and Normalize modules.
"""

import torch
from transformers import LlamaConfig, LlamaModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPast


class LlamaBidirectionalConfig(LlamaConfig):
    model_type = "llama_bidirec"

    def __init__(self, pooling: str = "avg", **kwargs):
        kwargs["is_causal"] = False
        super().__init__(**kwargs)
        self.pooling = pooling  # "avg": mean over non-pad tokens (the reference's name)
        self.is_causal = False


class LlamaBidirectionalModel(LlamaModel):
    config_class = LlamaBidirectionalConfig

    def __init__(self, config: LlamaConfig):
        config.is_causal = False
        super().__init__(config)
        for module in self.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = False

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """input_ids (B, L), attention_mask (B, L) with 1 = token, 0 = pad -> last_hidden_state (B, L, D)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        for key in ("past_key_values", "cache", "use_cache", "cache_position", "return_dict"):
            kwargs.pop(key, None)  # an encoder keeps no KV cache
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            # With left padding these positions are shifted by the pad count; RoPE only sees
            # relative positions, so the embeddings agree with unpadded ones up to float error.
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
        # Positional arguments: the second one was renamed (input_embeds -> inputs_embeds) within 5.x.
        mask = create_bidirectional_mask(self.config, inputs_embeds, attention_mask)

        hidden = inputs_embeds
        all_hidden = [hidden] if output_hidden_states else None
        position_embeddings = self.rotary_emb(hidden, position_ids)
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            if isinstance(hidden, tuple):  # older layers return (hidden, ...)
                hidden = hidden[0]
            if output_hidden_states:
                all_hidden.append(hidden)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden[-1] = hidden
        return BaseModelOutputWithPast(
            last_hidden_state=hidden, hidden_states=tuple(all_hidden) if output_hidden_states else None
        )


__all__ = ["LlamaBidirectionalConfig", "LlamaBidirectionalModel"]
