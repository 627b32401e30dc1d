"""model/: bidirectionality on every attention path, packed == padded, pooling, loss, encode."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from model import BiEncoder, contrastive_loss, make_bidirectional, pack
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
