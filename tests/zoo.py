"""Models nobody here wrote, built from tiny configs (no download) and called the way their
documentation calls them: default position ids, attention masks with padding."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_PEFT = importlib.util.find_spec("peft") is not None

BATCH, SEQ, VOCAB = 3, 6, 40


@dataclass
class ZooCase:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[], dict[str, Tensor]]
    output: Callable[[nn.Module, dict[str, Tensor]], Tensor]
    fallback: bool = False
    needs: tuple[str, ...] = ("transformers",)
    #: parameters to freeze (name prefixes or substrings) before making the model private
    freeze: tuple[str, ...] = ()
    #: the refusal expected instead of exact gradients (a regex on the error)
    refused: str | None = None
    extra: dict = field(default_factory=dict)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Sum over examples of a fixed nonlinear readout of every output position."""
        out = self.output(model, batch)
        return (out.tanh() + 0.5 * out.pow(2)).sum()


def _ids(seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)


def _mask() -> Tensor:
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -2:] = 0  # right padding on one example
    mask[2, -1:] = 0
    return mask


def _text() -> dict[str, Tensor]:
    return {"input_ids": _ids(), "attention_mask": _mask()}


def _seq2seq() -> dict[str, Tensor]:
    return {**_text(), "decoder_input_ids": _ids(2)[:, :4]}


def _logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(**batch).logits


def _forecast_batch() -> dict[str, Tensor]:
    """Past values with their time features, and the future ones teacher forcing reads."""
    g = torch.Generator().manual_seed(8)
    return {"past_values": torch.randn(BATCH, 10, generator=g),
            "past_time_features": torch.randn(BATCH, 10, 1, generator=g),
            "past_observed_mask": torch.ones(BATCH, 10),
            "future_values": torch.randn(BATCH, 4, generator=g),
            "future_time_features": torch.randn(BATCH, 4, 1, generator=g)}


def _hidden_and_pooled(output: object) -> Tensor:
    """Every token's hidden state and the pooled output (its own layer norm), per example."""
    return torch.cat([output.last_hidden_state.flatten(1), output.pooler_output], dim=1)


def _hf(config_name: str, model_name: str, **config: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_name)(**config)
        return getattr(transformers, model_name)(cfg)

    return build


_DECODER = dict(
    vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, head_dim=8,
)


_GPT2 = _hf("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2,
            n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _lora(base: Callable[[], nn.Module], targets: list[str], **lora: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from peft import LoraConfig, get_peft_model

        model = base()
        config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0, **lora)
        return get_peft_model(model, config)

    return build


def _prefix(base: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from peft import PrefixTuningConfig, get_peft_model

        return get_peft_model(base(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))

    return build


def _ia3(base: Callable[[], nn.Module], targets: list[str], feedforward: list[str]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from peft import IA3Config, get_peft_model

        model = get_peft_model(base(), IA3Config(target_modules=targets, feedforward_modules=feedforward))
        for name, p in model.named_parameters():  # peft starts IA3 at ones: move off the identity
            if "ia3_l" in name:
                p.data.uniform_(0.5, 1.5)
        return model

    return build


class Recurrent(nn.Module):
    """An embedding, a recurrent layer and a head on the last state."""

    def __init__(self, kind: type[nn.RNNBase], batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, 6)
        self.rnn = kind(6, 5, num_layers=2, batch_first=batch_first, bidirectional=True)
        self.head = nn.Linear(10, 3)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids)
        out, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        return self.head(out if self.batch_first else out.transpose(0, 1))


class ScaledLinear(nn.Linear):
    """A user's subclass that overrides forward: training must compute this, not nn.Linear."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x * 2.0, self.weight, self.bias).tanh()


class MatmulLinear(nn.Module):
    """Linear layers written as matmuls on the module's own parameters: ``x @ w.t() + b`` and
    ``x @ w`` (GPT-2 ``Conv1D``'s layout), the first output then changed in place (as Falcon's
    ``mlp_output += attention_output``)."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, d) / d**0.5)
        self.b = nn.Parameter(torch.randn(8) / 4)
        self.w_io = nn.Parameter(torch.randn(d, 8) / d**0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = x @ self.w.t() + self.b
        h += torch.matmul(x, self.w_io)
        return h.tanh()


class Gated(nn.Module):
    """A custom module calling F.linear on its own parameters, twice."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(8, d) / d**0.5)
        self.w_gate = nn.Parameter(torch.randn(8, d) / d**0.5)
        self.b = nn.Parameter(torch.zeros(8))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.w_in, self.b) * torch.sigmoid(F.linear(x, self.w_gate))


class ScaleShift(nn.Module):
    """Bare parameters in elementwise ops, written the ways people write them: a layer-scale
    vector, an offset scale in float32 (Gemma's norm), a reshaped bias, a negated scale."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(d))
        self.offset = nn.Parameter(0.1 * torch.randn(d))
        self.bias = nn.Parameter(torch.randn(d))
        self.flip = nn.Parameter(torch.randn(4, 1))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(x) * self.gamma
        h = (h * (1.0 + self.offset.float())).type_as(x)
        h = h + self.bias.view(1, 1, -1) / 2
        return torch.mul(2.0 - self.flip, h)


class TorchEncoder(nn.Module):
    """``nn.TransformerEncoder`` over embeddings, called as its docs show: a causal mask with
    the ``is_causal`` hint and a key padding mask (True: padding)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        layer = nn.TransformerEncoderLayer(d, 2, 12, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(input_ids.shape[1], dtype=torch.float64)
        padding = torch.zeros(attention_mask.shape, dtype=torch.float64).masked_fill(attention_mask == 0, float("-inf"))
        h = self.encoder(self.embed(input_ids), mask=causal, src_key_padding_mask=padding, is_causal=True)
        return self.head(h)


class TorchDecoder(nn.Module):
    """``nn.TransformerDecoderLayer``: self-attention, then cross-attention to a memory
    (key and value the same tensor), and an ``nn.MultiheadAttention`` whose key and value
    differ, returning its attention weights."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.decoder = nn.TransformerDecoderLayer(d, 2, 12, dropout=0.0, batch_first=True)
        self.attend = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        memory = self.embed(input_ids[:, :3]).flip(1)
        h = self.decoder(self.embed(input_ids), memory, memory_key_padding_mask=attention_mask[:, :3] == 0)
        out, weights = self.attend(h, memory, memory.tanh())
        return self.head(out) + weights.sum(-1, keepdim=True)


def _plain(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(**batch)


def _floats() -> dict[str, Tensor]:
    return {"x": torch.randn(BATCH, 4, 6, generator=torch.Generator().manual_seed(3))}


ZOO = [
    ZooCase("gpt2", _hf("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=16, n_layer=2,
                        n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
            _text, _logits),
    ZooCase("bert", _hf("BertConfig", "BertForSequenceClassification", vocab_size=VOCAB,
                        hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, max_position_embeddings=32, num_labels=3),
            _text, _logits),
    ZooCase("distilbert", _hf("DistilBertConfig", "DistilBertForSequenceClassification",
                              vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=24,
                              dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
                              max_position_embeddings=32, num_labels=3),
            _text, _logits),
    ZooCase("roberta", _hf("RobertaConfig", "RobertaForSequenceClassification", vocab_size=VOCAB,
                           hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=24, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, max_position_embeddings=32,
                           num_labels=3),
            _text, _logits),
    ZooCase("vit", _hf("ViTConfig", "ViTForImageClassification", image_size=8, patch_size=4,
                       num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=24, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=3),
            lambda: {"pixel_values": torch.randn(BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(4))},
            _logits),  # class token (expanded, concatenated) and position embeddings routed
    # two tokens in one concatenation (class and distillation), one clipping group with the positions
    # a 1-D class embedding expanded to [B, 1, d] (leading dims added) and concatenated
    ZooCase("clip_vision", _hf("CLIPVisionConfig", "CLIPVisionModel", image_size=8, patch_size=4,
                               num_channels=3, hidden_size=16, intermediate_size=24,
                               num_hidden_layers=1, num_attention_heads=2),
            lambda: {"pixel_values": torch.randn(BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(4))},
            lambda m, b: _hidden_and_pooled(m(**b))),
    # a pooling head's probe repeated per example (probe.repeat(B, 1, 1)) as an attention's query
    ZooCase("siglip_vision", _hf("SiglipVisionConfig", "SiglipVisionModel", image_size=8, patch_size=4,
                                 num_channels=3, hidden_size=16, intermediate_size=24,
                                 num_hidden_layers=1, num_attention_heads=2),
            lambda: {"pixel_values": torch.randn(BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(4))},
            lambda m, b: _hidden_and_pooled(m(**b))),
    ZooCase("deit", _hf("DeiTConfig", "DeiTForImageClassification", image_size=8, patch_size=4,
                        num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=24, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=3),
            lambda: {"pixel_values": torch.randn(BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(4))},
            _logits),
    # the HF RMSNorm family (w * h, Gemma's h * (1 + w)) without the fallback
    ZooCase("llama", _hf("LlamaConfig", "LlamaForCausalLM", **_DECODER), _text, _logits),
    ZooCase("mistral", _hf("MistralConfig", "MistralForCausalLM", sliding_window=4, **_DECODER),
            _text, _logits),
    ZooCase("qwen2_tied", _hf("Qwen2Config", "Qwen2ForCausalLM", tie_word_embeddings=True, **_DECODER),
            _text, _logits),
    ZooCase("gemma3", _hf("Gemma3TextConfig", "Gemma3ForCausalLM", sliding_window=4, **_DECODER),
            _text, _logits),
    # more decoders as their configs build them: fused qkv and partial rotary (Phi3, GPT-NeoX with
    # its parallel residual), q/k norms (Qwen3), logit softcapping (Gemma2)
    ZooCase("phi3", _hf("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, resid_pdrop=0.0,
                        embd_pdrop=0.0, attention_dropout=0.0, partial_rotary_factor=0.5, **_DECODER),
            _text, _logits),
    ZooCase("qwen3", _hf("Qwen3Config", "Qwen3ForCausalLM", **_DECODER), _text, _logits),
    ZooCase("gpt_neox", _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", vocab_size=VOCAB, hidden_size=16,
                            num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                            max_position_embeddings=32, rotary_pct=0.5, hidden_dropout=0.0,
                            attention_dropout=0.0),
            _text, _logits),
    ZooCase("gemma2", _hf("Gemma2Config", "Gemma2ForCausalLM", sliding_window=4,
                          final_logit_softcapping=30.0, attn_logit_softcapping=50.0, **_DECODER),
            _text, _logits),
    # one layer's parameters applied at every depth (ALBERT), local/global attention (ModernBERT)
    ZooCase("albert", _hf("AlbertConfig", "AlbertForSequenceClassification", vocab_size=VOCAB,
                          embedding_size=8, hidden_size=16, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=24, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
                          max_position_embeddings=32, num_labels=3),
            _text, _logits),
    ZooCase("modernbert", _hf("ModernBertConfig", "ModernBertForSequenceClassification",
                              vocab_size=VOCAB, hidden_size=16, intermediate_size=24,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                              num_labels=3, global_attn_every_n_layers=2, local_attention=4,
                              pad_token_id=0, embedding_dropout=0.0, mlp_dropout=0.0,
                              attention_dropout=0.0, classifier_dropout=0.0),
            _text, _logits),
    # DeBERTa-v2's relative attention repeats its position projections per example itself: with
    # them, the relative embeddings and their norm frozen, the rest is exact
    ZooCase("deberta_v2_positions_frozen",
            _hf("DebertaV2Config", "DebertaV2ForSequenceClassification", vocab_size=VOCAB,
                hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                max_position_embeddings=32, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, num_labels=3, relative_attention=True,
                pos_att_type=["p2c", "c2p"], position_buckets=8, share_att_key=False),
            _text, _logits,
            freeze=("pos_key_proj", "pos_query_proj", "encoder.rel_embeddings", "encoder.LayerNorm")),
    ZooCase("t5", _hf("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB, d_model=16, d_kv=8,
                      d_ff=24, num_layers=1, num_heads=2, dropout_rate=0.0),
            _seq2seq, _logits, refused=r"relative_attention_bias.*freeze"),
    ZooCase("t5_bias_frozen", _hf("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB,
                                  d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
                                  dropout_rate=0.0),
            _seq2seq, _logits, freeze=("relative_attention_bias",)),
    ZooCase("bart", _hf("BartConfig", "BartForConditionalGeneration", vocab_size=VOCAB, d_model=16,
                        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
                        max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
                        activation_dropout=0.0),
            _seq2seq, _logits),
    ZooCase("whisper", _hf("WhisperConfig", "WhisperForConditionalGeneration", vocab_size=VOCAB,
                           num_mel_bins=4, d_model=16, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2,
                           encoder_ffn_dim=24, decoder_ffn_dim=24, max_source_positions=4,
                           max_target_positions=16, dropout=0.0, attention_dropout=0.0,
                           activation_dropout=0.0, decoder_start_token_id=1, pad_token_id=0),
            lambda: {"input_features": torch.randn(BATCH, 4, 8, generator=torch.Generator().manual_seed(5)),
                     "decoder_input_ids": _ids(6)[:, :4]},
            _logits),
    # time series (health monitoring is a DP use case): patches mixed by MLPs, and a probabilistic
    # forecaster (lagged values, time features, an encoder-decoder) read by its distribution's parameters
    ZooCase("patchtsmixer", _hf("PatchTSMixerConfig", "PatchTSMixerForTimeSeriesClassification",
                                num_input_channels=2, context_length=16, patch_length=4,
                                patch_stride=4, d_model=8, num_layers=1, num_targets=3, dropout=0.0,
                                head_dropout=0.0, norm_mlp="LayerNorm", scaling=None),
            lambda: {"past_values": torch.randn(BATCH, 16, 2, generator=torch.Generator().manual_seed(7))},
            lambda m, b: m(**b).prediction_outputs),
    ZooCase("time_series_transformer",
            _hf("TimeSeriesTransformerConfig", "TimeSeriesTransformerForPrediction", prediction_length=4,
                context_length=8, lags_sequence=[1, 2], num_time_features=1, d_model=8,
                encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, dropout=0.0,
                attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
                decoder_layerdrop=0.0, scaling=None),
            _forecast_batch, lambda m, b: torch.cat([p.flatten(1) for p in m(**b).params], dim=1)),
    ZooCase("lora_gpt2", _lora(_GPT2, ["c_attn", "c_proj"]),
            _text, _logits, needs=("transformers", "peft")),
    # peft adapters read by their layer's forward in ways no rule's op sees (DoRA's factors on an
    # identity matrix, factors kept in ParameterDicts): the whole layer through the fallback
    ZooCase("dora_gpt2", _lora(_GPT2, ["c_attn", "c_proj"], use_dora=True, init_lora_weights=False),
            _text, _logits, fallback=True, needs=("transformers", "peft")),
    ZooCase("dora_llama", _lora(_hf("LlamaConfig", "LlamaForCausalLM", **_DECODER),
                                ["q_proj", "down_proj"], use_dora=True, init_lora_weights=False),
            _text, _logits, fallback=True, needs=("transformers", "peft")),
    ZooCase("lora_embedding_gpt2", _lora(_GPT2, ["wte", "c_attn"], init_lora_weights=False),
            _text, _logits, fallback=True, needs=("transformers", "peft")),
    ZooCase("ia3_gpt2", _ia3(_GPT2, ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
            _text, _logits, fallback=True, needs=("transformers", "peft")),
    # prefix tuning encodes one prompt row per example (prompt tuning, repeated over the batch by
    # peft, is refused: tests/engine/test_validation.py)
    ZooCase("prefix_llama", _prefix(_hf("LlamaConfig", "LlamaForCausalLM", **_DECODER)),
            _text, _logits, needs=("transformers", "peft")),
    # OPT runs its MLP on hidden states flattened to [B*T, D]: full fine-tuning is refused there,
    # LoRA on the attention projections (peft's default targets for OPT) is exact
    ZooCase("lora_opt", _lora(_hf("OPTConfig", "OPTForCausalLM", vocab_size=VOCAB, hidden_size=16,
                                  num_hidden_layers=2, num_attention_heads=2, ffn_dim=24,
                                  max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.0,
                                  attention_dropout=0.0), ["q_proj", "v_proj"]),
            _text, _logits, needs=("transformers", "peft")),
    ZooCase("opt", _hf("OPTConfig", "OPTForCausalLM", vocab_size=VOCAB, hidden_size=16,
                       num_hidden_layers=2, num_attention_heads=2, ffn_dim=24,
                       max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.0,
                       attention_dropout=0.0),
            _text, _logits, refused=r"final_layer_norm.*rows"),
    # choices merged into the batch ([B, C, T] viewed as [B*C, T]): refused, naming the merge
    ZooCase("bert_multiple_choice", _hf("BertConfig", "BertForMultipleChoice", vocab_size=VOCAB,
                                        hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=24, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, max_position_embeddings=32),
            lambda: {k: v.unsqueeze(1).expand(-1, 2, -1).contiguous() for k, v in _text().items()},
            _logits, refused=r"word_embeddings.*2 times the examples: perhaps the model merged"),
    ZooCase("lora_llama", _lora(_hf("LlamaConfig", "LlamaForCausalLM", **_DECODER),
                                ["q_proj", "v_proj", "down_proj"]),
            _text, _logits, needs=("transformers", "peft")),
    # torch.nn's attention through its projections (no fallback), self- and cross-attention
    ZooCase("torch_encoder", TorchEncoder, _text, _plain, needs=()),
    ZooCase("torch_decoder", TorchDecoder, _text, _plain, needs=()),
    ZooCase("lstm", lambda: Recurrent(nn.LSTM, batch_first=True), lambda: {"input_ids": _ids()},
            _plain, needs=()),
    ZooCase("gru_time_major", lambda: Recurrent(nn.GRU, batch_first=False),
            lambda: {"input_ids": _ids()}, _plain, needs=()),
    ZooCase("rnn", lambda: Recurrent(nn.RNN, batch_first=True), lambda: {"input_ids": _ids()},
            _plain, needs=()),
    ZooCase("linear_subclass", lambda: nn.Sequential(ScaledLinear(6, 5), nn.Linear(5, 2)), _floats,
            lambda m, b: m(b["x"]), needs=()),
    ZooCase("custom_f_linear", lambda: nn.Sequential(Gated(), nn.Linear(8, 2)), _floats,
            lambda m, b: m(b["x"]), needs=()),
    # FalconLinear's x @ w.T through the fallback, and an in-place add on a private layer's output
    ZooCase("falcon", _hf("FalconConfig", "FalconForCausalLM", vocab_size=VOCAB, hidden_size=16,
                          num_hidden_layers=2, num_attention_heads=2, hidden_dropout=0.0,
                          attention_dropout=0.0, max_position_embeddings=32),
            _text, _logits, fallback=True),
    ZooCase("matmul_linear", lambda: nn.Sequential(MatmulLinear(), nn.Linear(8, 2)), _floats,
            lambda m, b: m(b["x"]), needs=()),
    ZooCase("scale_shift", lambda: nn.Sequential(nn.Linear(6, 6), ScaleShift(), nn.Linear(6, 2)), _floats,
            lambda m, b: m(b["x"]), needs=()),
]


def available(case: ZooCase) -> bool:
    return all({"transformers": HAS_TRANSFORMERS, "peft": HAS_PEFT}[n] for n in case.needs)


def build(case: ZooCase) -> tuple[nn.Module, dict[str, Tensor]]:
    """The case's model in float64, its trainable parameters chosen, and its batch."""
    torch.manual_seed(0)
    model = case.build().double()
    for name, p in model.named_parameters():
        if any(f in name for f in case.freeze):
            p.requires_grad_(False)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in case.batch().items()}
    return model, batch


def split(batch: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """One-example batches, each with its own rows of every input (its own padding mask)."""
    size = next(iter(batch.values())).shape[0]
    return [{k: v[i : i + 1] for k, v in batch.items()} for i in range(size)]
