"""model/: bidirectionality on every attention path, packed == padded, pooling, loss, encode."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoTokenizer

from model import BiEncoder, contrastive_loss, make_bidirectional, pack
from model.biencoder import positions_from_cu_seqlens
from tiny_models import llama_tokenizer_dir, minilm_dir, save_tiny_llama, tiny_llama

SEQS = [[128000, 5, 6, 7, 8, 9], [128000, 9, 10], [128000, 3, 4, 5, 6, 7, 8, 9, 10, 11], [128000, 42]]


def padded(seqs, side):
    L = max(map(len, seqs))
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


def first_token_state(encoder, seq, path):
    """Hidden state of the first token of `seq`, computed along one attention path."""
    ids = torch.tensor([seq])
    if path == "packed":
        enc = BiEncoder(encoder)
        _, cu = pack([seq])
        out = enc.encoder(input_ids=ids, position_ids=torch.arange(len(seq))[None], cu_seqlens=cu, max_seqlen=len(seq))
        return out.last_hidden_state[0, 0]
    if path == "padded-with-pad":  # a batch with padding builds a mask; one without relies on is_causal
        ids, mask = padded([seq, seq[:2]], "right")
        return encoder(input_ids=ids, attention_mask=mask).last_hidden_state[0, 0]
    return encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0, 0]


PATHS = [(impl, path) for impl in ("biencoder", "sdpa", "eager") for path in ("padded", "padded-with-pad")]


@pytest.mark.parametrize("impl,path", PATHS + [("biencoder", "packed")])
def test_changing_last_token_changes_first_token(impl, path):
    seq = SEQS[2]
    changed = seq[:-1] + [777]
    bidir = make_bidirectional(tiny_llama(attn_implementation=impl))
    with torch.no_grad():
        assert not torch.allclose(first_token_state(bidir, seq, path), first_token_state(bidir, changed, path))
    # Control: the stock causal model does not see the change, so the check above can fail.
    if impl != "biencoder":
        causal = tiny_llama(attn_implementation=impl)
        with torch.no_grad():
            torch.testing.assert_close(first_token_state(causal, seq, path), first_token_state(causal, changed, path))


def reference_embeddings(seqs):
    """Independent computation: a plain eager LlamaModel with a full non-causal 4D mask, pooled by hand."""
    model = tiny_llama(attn_implementation="eager")
    out = []
    for s in seqs:
        ids = torch.tensor([s])
        full = torch.zeros(1, 1, len(s), len(s))  # additive mask: 0 everywhere = every token sees every token
        h = model(input_ids=ids, attention_mask=full).last_hidden_state[0]
        out.append(F.normalize(h.mean(0), dim=-1))
    return torch.stack(out)


def test_embeddings_equal_independent_reference():
    enc = BiEncoder(tiny_llama())
    with torch.no_grad():
        ref = reference_embeddings(SEQS)
        torch.testing.assert_close(enc(*pack(SEQS)), ref, atol=1e-5, rtol=1e-5)
        for side in ("left", "right"):
            torch.testing.assert_close(enc.forward_padded(*padded(SEQS, side)), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_packed_equals_padded_embeddings_and_gradients(side):
    enc = BiEncoder(tiny_llama())
    weights = torch.randn(len(SEQS), 64, generator=torch.Generator().manual_seed(1))

    def grads(embed):
        enc.zero_grad()
        e = embed()
        (e * weights).sum().backward()
        return e.detach(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}

    e_packed, g_packed = grads(lambda: enc(*pack(SEQS)))
    e_padded, g_padded = grads(lambda: enc.forward_padded(*padded(SEQS, side)))
    torch.testing.assert_close(e_packed, e_padded, atol=1e-5, rtol=1e-5)
    assert g_packed.keys() == g_padded.keys() and len(g_packed) > 10
    for name in g_packed:
        torch.testing.assert_close(g_packed[name], g_padded[name], atol=1e-5, rtol=1e-4, msg=name)


def test_minilm_packed_equals_padded_and_sentence_transformers():
    SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer
    enc = BiEncoder.from_pretrained(minilm_dir())
    texts = ["A short one.", "Mean pooling over all tokens of a much longer sentence, with padding.", "x"]
    ids = enc.tokenizer(texts)["input_ids"]
    with torch.no_grad():
        packed = enc(*pack(ids))
        for side in ("left", "right"):
            torch.testing.assert_close(packed, enc.forward_padded(*padded(ids, side)), atol=1e-5, rtol=1e-5)
    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    ref = torch.as_tensor(st.encode(texts, convert_to_numpy=True))
    torch.testing.assert_close(enc.encode(texts), ref, atol=1e-5, rtol=1e-4)


def direct_loss(q, p, temperature, in_batch, doc_ids):
    """The loss written out: -log softmax of the positive, query by query."""
    B, n = q.shape[0], p.shape[0] // q.shape[0]
    total = 0.0
    for b in range(B):
        cands = range(B * n) if in_batch else range(b * n, (b + 1) * n)
        pos = b * n
        if in_batch and doc_ids is not None:
            cands = [j for j in cands if j == pos or doc_ids[j] != doc_ids[pos]]
        s = torch.stack([q[b] @ p[j] for j in cands]) / temperature
        total = total - (s[list(cands).index(pos)] - torch.logsumexp(s, 0))
    return total / B


@pytest.mark.parametrize("k", [1, 4, 7])
@pytest.mark.parametrize("in_batch", [False, True])
def test_loss_equals_direct_computation(k, in_batch):
    g = torch.Generator().manual_seed(k)
    B, D = 3, 16
    q = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    p = F.normalize(torch.randn(B * (1 + k), D, generator=g), dim=-1)
    doc_ids = torch.randint(0, 4 * B, (B * (1 + k),), generator=g)
    doc_ids[(1 + k) * 1] = doc_ids[0]  # query 1's positive is query 0's positive too: masked for query 0
    for ids in (None, doc_ids):
        got = contrastive_loss(q, p, 0.02, in_batch_negatives=in_batch, doc_ids=ids)
        torch.testing.assert_close(got, direct_loss(q, p, 0.02, in_batch, ids))
    summed = contrastive_loss(q, p, 0.05, in_batch_negatives=in_batch, reduction="sum")
    torch.testing.assert_close(summed, B * direct_loss(q, p, 0.05, in_batch, None))


@pytest.mark.parametrize("in_batch", [False, True])
def test_loss_gradcheck(in_batch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.randn(2 * 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    doc_ids = torch.tensor([0, 1, 2, 0, 3, 4])
    fn = lambda q, p: contrastive_loss(F.normalize(q, dim=-1), F.normalize(p, dim=-1), 0.1, in_batch, doc_ids)
    assert torch.autograd.gradcheck(fn, (q, p))


def test_encode_equals_training_forward_whatever_batch_and_order(tmp_path):
    enc = BiEncoder.from_pretrained(save_tiny_llama(tmp_path / "tiny"))
    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir())
    prompt = "Instruct: Given a claim, retrieve documents\nQuery: "
    texts = ["short", "a somewhat longer text about proteins", "tiny", "the longest text of them all, " * 5, "mid one"]
    ids = tok([prompt + t for t in texts])["input_ids"]
    assert all(s[0] == tok.bos_token_id for s in ids)
    with torch.no_grad():
        train_emb = enc(*pack(ids))
    for bs in (1, 2, 64):
        torch.testing.assert_close(enc.encode(texts, prompt=prompt, batch_size=bs), train_emb, atol=1e-5, rtol=1e-5)
    perm = [3, 0, 4, 1, 2]
    shuffled = enc.encode([texts[i] for i in perm], prompt=prompt)
    torch.testing.assert_close(shuffled, train_emb[perm], atol=1e-5, rtol=1e-5)
    norms = enc.encode(texts).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


# torch's varlen_attn changed its signature between releases; the adapter passes only what each has.
def _segments_reference(q, k, v, cu, scale, causal):
    """Plain per-segment attention with explicit scale, causality and KV-head expansion."""
    out = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))  # (H, L, d)
        scores = (qs @ ks.transpose(1, 2)) * scale
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        out.append((scores.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(out)


def varlen_torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert query.shape[1] == key.shape[1], "2.10 has no GQA: heads must match"
    return _segments_reference(query, key, value, cu_seq_q, query.shape[-1] ** -0.5, is_causal)


def varlen_torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1)):  # fmt: skip
    assert query.shape[1] == key.shape[1], "2.11 has no GQA: heads must match"
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return _segments_reference(query, key, value, cu_seq_q, scale, tuple(window_size) == (-1, 0))


def varlen_torch_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1), enable_gqa=False):  # fmt: skip
    if enable_gqa:
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    return varlen_torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size)


@pytest.mark.parametrize("fn", [varlen_torch_2_10, varlen_torch_2_11, varlen_torch_2_13])
def test_varlen_adapter_gives_scaled_gqa_attention_causal_or_not_on_every_signature(fn):
    from model.attention import adapt_varlen, packed_attention

    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    q, k, v = torch.randn(13, 4, 8), torch.randn(13, 2, 8), torch.randn(13, 2, 8)  # 4 query heads, 2 KV heads
    calls = []

    def spy(*args, **kwargs):
        calls.append(sorted(kwargs))
        return fn(*args, **kwargs)

    spy.__signature__ = inspect.signature(fn)
    for scale in (8**-0.5, 0.3):  # the default 1/sqrt(d) and another one (folded into q where unsupported)
        got = adapt_varlen(spy)(q, k, v, cu, 7, scale)
        want = packed_attention(q, k, v, cu, 7, scale)  # the CPU reference path
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        causal = _segments_reference(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), cu, scale, True)
        assert not torch.allclose(got, causal, atol=1e-3)  # and it is not the causal result
        # causal (a teacher kept causal by the miner): the kernel, the CPU path and the reference agree
        got_causal = adapt_varlen(spy)(q, k, v, cu, 7, scale, True)
        torch.testing.assert_close(got_causal, causal, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed_attention(q, k, v, cu, 7, scale, causal=True), causal, rtol=1e-5, atol=1e-5)
    assert all(set(c) <= set(inspect.signature(fn).parameters) for c in calls)


# A packed forward builds no (T, T) mask. transformers sees the packing in the (1, T) position_ids and,
# for a causal model (create_causal_mask) or a BERT-family encoder (create_bidirectional_mask), would
# build a (1, 1, T, T) block-diagonal mask (1 GiB at T = 32k) that the packed attention never reads.
class LargestTensor(TorchDispatchMode):
    """Records the largest storage any operation creates while active (parameters are not created)."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > self.nbytes:
                self.nbytes, self.op = t.untyped_storage().nbytes(), f"{func} -> {tuple(t.shape)} {t.dtype}"
        return out


def test_packed_causal_forward_memory_is_linear_in_tokens():
    teacher = BiEncoder(tiny_llama(), pooling="lasttoken", bidirectional=False)  # a causal teacher
    largest = {}
    for n in (16, 64):  # texts of 512 tokens: T = 8k and 32k (a T x T bool mask: 64 MiB and 1 GiB)
        seqs = [[(7 * i + j) % 1000 + 1 for j in range(512)] for i in range(n)]
        with torch.no_grad(), LargestTensor() as m:
            emb = teacher(*pack(seqs))
        assert emb.shape == (n, 64) and torch.isfinite(emb).all()
        largest[n * 512] = m
    T = 64 * 512
    detail = {t: f"{m.nbytes / 2**20:.1f} MiB ({m.op})" for t, m in largest.items()}
    assert largest[T].nbytes < T * T // 16, f"a (T, T) tensor in the packed forward: {detail}"
    assert largest[T].nbytes <= 4 * largest[T // 4].nbytes, f"not linear in T: {detail}"


def tiny_qwen3():
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16)
    return Qwen3Model(Qwen3Config(vocab_size=1000, num_key_value_heads=2, **shape)).eval()


@pytest.mark.parametrize("kind", ["llama-causal", "qwen3-causal", "llama-bidirectional", "minilm"])
def test_mask_is_built_for_padded_batches_only_and_both_paths_agree(kind, monkeypatch):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if kind == "minilm":
        enc = BiEncoder.from_pretrained(minilm_dir(), tokenizer=False)
    else:
        model = tiny_qwen3() if kind == "qwen3-causal" else tiny_llama()
        enc = BiEncoder(model, bidirectional=kind == "llama-bidirectional")
    built = []
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS[enc.encoder.config._attn_implementation]

    def spy(*args, **kwargs):
        mask = mask_fn(*args, **kwargs)
        built.append(None if mask is None else tuple(mask.shape))
        return mask

    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "biencoder", spy)
    seqs = [[101, 5, 6, 7, 8, 9, 102], [101, 9, 10, 102], [101, 42, 102]]
    ids, cu = pack(seqs)
    with torch.no_grad():
        packed = enc.encoder(
            input_ids=ids[None], position_ids=positions_from_cu_seqlens(cu, len(ids))[None], cu_seqlens=cu,
            max_seqlen=7,
        ).last_hidden_state[0]  # fmt: skip
        assert built and all(m is None for m in built), built
        # Left padding: pads come before the tokens, so a padded path without its mask would read them.
        built.clear()
        pids, mask = padded(seqs, "left")
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = enc.encoder(input_ids=pids, attention_mask=mask, position_ids=positions).last_hidden_state
    assert built and all(m is not None and m[-2:] == (7, 7) for m in built), built
    torch.testing.assert_close(out[mask.bool()], packed, atol=1e-5, rtol=1e-5)


def test_packed_forward_marker_is_registered_once_and_cleared_after_an_error():
    import model.attention as attention

    teacher = BiEncoder(tiny_llama(), pooling="lasttoken", bidirectional=False)
    hooks = dict(teacher.encoder._forward_pre_hooks)
    BiEncoder(teacher.encoder, pooling="lasttoken", bidirectional=False)  # wrapped again: no second hook
    assert teacher.encoder._forward_pre_hooks == hooks
    ids, cu = pack(SEQS)
    with torch.no_grad(), pytest.raises(KeyError, match="max_seqlen"):
        teacher.encoder(input_ids=ids[None], cu_seqlens=cu)  # a packed forward that fails in the attention
    assert attention._PACKED_FORWARDS.get() == ()
    # a padded batch after it still gets its causal and padding mask: left-padded == each text alone
    pids, mask = padded(SEQS, "left")
    with torch.no_grad():
        out = teacher.encoder(input_ids=pids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        for row, s in enumerate(SEQS):
            alone = teacher.encoder(input_ids=torch.tensor([s])).last_hidden_state[0]
            torch.testing.assert_close(out.last_hidden_state[row, -len(s) :], alone, atol=1e-5, rtol=1e-5)


def test_token_batches_respect_both_limits_and_keep_every_text_once():
    from model.biencoder import token_batches

    lengths = [500, 300, 300, 200, 100, 40, 40, 30, 10, 5]
    assert token_batches(lengths, None, 600) == [(0, 1), (1, 3), (3, 10)]
    assert token_batches(lengths, 3, 10_000) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert token_batches([700, 10], None, 600) == [(0, 1), (1, 2)]  # a longer text goes alone
    assert token_batches(lengths, None, None) == [(0, 10)] and token_batches([], 4, 100) == []
    for max_texts, max_tokens in [(2, None), (None, 250), (4, 400)]:
        batches = token_batches(lengths, max_texts, max_tokens)
        assert [i for a, b in batches for i in range(a, b)] == list(range(len(lengths)))


def test_encode_by_token_budget_equals_encode_by_count(llama_tokenizer_path, tmp_path):
    enc = BiEncoder.from_pretrained(save_tiny_llama(tmp_path / "m"))
    texts = [("word " * n).strip() for n in (1, 40, 7, 3, 90, 12, 5, 60)]
    by_count = enc.encode(texts, batch_size=3, max_length=64)
    by_tokens = enc.encode(texts, batch_size=None, max_tokens=70, max_length=64)
    torch.testing.assert_close(by_tokens, by_count, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "body, why",
    [
        ("raise OSError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')", "OSError: flash_attn_2"),
        ("import flash_attn_2_cuda_missing_part", "ModuleNotFoundError: No module named 'flash_attn_2_cuda"),
        ("raise RuntimeError('compiled for another CUDA')", "RuntimeError: compiled for another CUDA"),
        (None, "flash-attn not installed"),
    ],
)
def test_a_broken_flash_attn_falls_back_to_torch_varlen_and_says_why(body, why, tmp_path, monkeypatch):
    """Any failure to import flash-attn (a build for another torch or CUDA is common) picks torch's varlen
    kernel instead of stopping every run, and the kernel line names the failure."""
    import sys

    import model.attention as attention

    if body is None:
        monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn -> ModuleNotFoundError
    else:
        (tmp_path / "flash_attn").mkdir()
        (tmp_path / "flash_attn" / "__init__.py").write_text(body + "\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    attention._varlen_kernel.cache_clear()
    try:
        name, run, _ = attention._varlen_kernel()
    finally:
        attention._varlen_kernel.cache_clear()
    assert name.startswith("torch.nn.attention.varlen.varlen_attn") and run is not None, name
    assert why in name, name


def test_a_gpu_older_than_ampere_takes_the_per_segment_path(monkeypatch):
    """flash-attn and torch's varlen_attn import on a V100 or T4 but fail at their first call (sm_80+):
    the packed path must not pick them there."""
    import model.attention as attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    attention._varlen_kernel.cache_clear()
    try:
        name, run, expands_kv = attention._varlen_kernel()
    finally:
        attention._varlen_kernel.cache_clear()
    assert run is None and expands_kv and "sm_70" in name and "fallback" in name, name
