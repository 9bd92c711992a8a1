"""Vocabulary extension (tokenizer_extend.py) on a tiny random GPT-2 (tied head) and Llama (untied head), with a
base BPE trained on news and a domain BPE trained on legal text, both made here."""

from __future__ import annotations

import pytest
import torch

from domainlm import tokenizer_extend as tx
from test_train_fixtures import LEGAL, NEWS, make_tokenizer, one_thread  # noqa: F401 (one_thread: autouse fixture)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("vocab")
    base = AutoTokenizer.from_pretrained(make_tokenizer(d / "base", 300, NEWS))
    dom = AutoTokenizer.from_pretrained(make_tokenizer(d / "domain", 400, LEGAL + NEWS))
    return base, dom


def _n_tokens(tok, texts):
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)


def test_choose_is_the_hand_computed_estimate(toks):
    """saved = count × (base pieces − 1), count = how often the domain tokenizer emits the token on the text."""
    base, dom = toks
    chosen = tx.choose(dom, base, LEGAL, 6)
    assert len(chosen) == 6
    emitted = [i for t in LEGAL for i in dom(t, add_special_tokens=False)["input_ids"]]
    for t in chosen:
        tid = dom.convert_tokens_to_ids(dom.tokenize(t.text))
        assert len(tid) == 1  # a single domain token
        assert t.count == emitted.count(tid[0])
        assert t.base_ids == tuple(base(t.text, add_special_tokens=False)["input_ids"])
        assert t.saved == t.count * (len(t.base_ids) - 1) > 0
    assert [t.saved for t in chosen] == sorted((t.saved for t in chosen), reverse=True)
    every = tx.choose(dom, base, LEGAL, 10_000)
    assert every[:6] == chosen  # the top 6 of all candidates
    assert all(len(t.base_ids) >= 2 for t in every)  # nothing the base has as one token already
    assert tx.choose(base, base, NEWS, 10) == []  # a tokenizer has nothing to add to itself


def test_new_tokens_are_used_and_decode(toks):
    base, dom = toks
    chosen = tx.choose(dom, base, LEGAL, 8)
    ext, ids = tx.extend_tokenizer(base, chosen)
    assert ids == list(range(len(base), len(base) + 8))
    assert len(base) == 300  # the base tokenizer is not modified
    used = {i for t in LEGAL for i in ext(t, add_special_tokens=False)["input_ids"]}
    assert used & set(ids)
    assert _n_tokens(ext, LEGAL) < _n_tokens(base, LEGAL)
    for t in LEGAL + NEWS:  # lossless
        assert ext.decode(ext(t, add_special_tokens=False)["input_ids"]) == t


def _gpt2(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()


def _llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False)).eval()


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2-tied", "llama-untied"])
def test_extend_model_keeps_old_rows_and_logits(toks, make):
    base, dom = toks
    chosen = tx.choose(dom, base, LEGAL, 5)
    ext, ids = tx.extend_tokenizer(base, chosen)
    model = make(len(base))
    old_emb = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    seq = torch.tensor([base(NEWS[0] + " " + LEGAL[0], add_special_tokens=False)["input_ids"][:60]])
    with torch.no_grad():
        before = model(seq).logits
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tx.extend_model(model, chosen, ids) == {"untied": tied}

    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.data_ptr() != head.data_ptr() and not model.config.tie_word_embeddings
    assert emb.shape[0] == head.shape[0] == model.config.vocab_size == len(ext)
    assert torch.equal(emb[: len(base)], old_emb) and torch.equal(head[: len(base)], old_head)
    for t, i in zip(chosen, ids, strict=True):
        # input: the mean of the base pieces' rows (Gee et al. 2022); output: the mean of all old rows (Hewitt 2021)
        torch.testing.assert_close(emb[i], old_emb[list(t.base_ids)].mean(dim=0), rtol=0, atol=0)
        torch.testing.assert_close(head[i], old_head.mean(dim=0), rtol=0, atol=0)
    with torch.no_grad():
        after = model(seq).logits
    assert after.shape[-1] == len(ext)
    torch.testing.assert_close(after[..., : len(base)], before, rtol=0, atol=1e-6)


def test_extend_writes_a_loadable_folder(toks, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, dom = toks
    base.save_pretrained(tmp_path / "base")
    _gpt2(len(base)).save_pretrained(tmp_path / "base")
    dom.save_pretrained(tmp_path / "domain")
    info = tx.extend(tmp_path / "base", tmp_path / "domain", LEGAL, 4, tmp_path / "out")
    assert info["added"] == 4 and info["vocab"] == len(base) + 4
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(tok) == model.get_input_embeddings().weight.shape[0] == 304
    assert {t["id"] for t in info["tokens"]} & set(tok(LEGAL[0])["input_ids"])
    assert info["untied"] and not model.config.tie_word_embeddings  # GPT-2's tied head: untied, saved, reloaded
    new = [t["id"] for t in info["tokens"]]
    torch.testing.assert_close(model.get_output_embeddings().weight[new[0]],
                               model.get_output_embeddings().weight[:300].mean(dim=0))


def _trained_llama(tok, texts: list[str], steps: int = 40):
    """A tiny Llama fitted to ``texts`` (peaked predictions, as a pretrained base has), eval mode."""
    model = _llama(len(tok)).train()
    batch = [torch.tensor([tok(t, add_special_tokens=False)["input_ids"]]) for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(steps):
        loss = sum(model(x, labels=x).loss for x in batch) / len(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_extended_base_keeps_its_predictions_on_general_text(toks):
    """Before any training, the extended base scores general text within 1% of the base's bits per byte (text
    the new tokens do not occur in: a new token as the target is what training has to learn), and at every
    position the new tokens together get at most N/V of the probability (Hewitt 2021's bound; Jensen's
    inequality). The mean of the pieces' output rows breaks the bound."""
    import copy

    from domainlm.evaluate import bpb

    base, dom = toks
    model = _trained_llama(base, NEWS + LEGAL)
    chosen = tx.choose(dom, base, LEGAL, 8)
    ext, ids = tx.extend_tokenizer(base, chosen)
    general = [t for t in NEWS + [n.replace("The ", "A ") for n in NEWS]
               if not set(ids) & set(ext(t, add_special_tokens=False)["input_ids"])]
    assert len(general) >= 4
    extended = copy.deepcopy(model)
    tx.extend_model(extended, chosen, ids)

    def score(m, tok):
        s = bpb.score_texts(m, tok, general, context=64, stride=32)
        return s.nll_nats / bpb.LN2 / s.bytes

    before, after = score(model, base), score(extended, ext)
    assert abs(after / before - 1) < 0.01, (before, after)

    def new_mass(m) -> float:  # the largest total probability the new tokens get at any position
        seq = torch.tensor([ext(" ".join(NEWS + LEGAL), add_special_tokens=False)["input_ids"][:64]])
        with torch.no_grad():
            return m(seq).logits.softmax(-1)[0, :, ids].sum(-1).max().item()

    assert new_mass(extended) <= len(ids) / len(base)
    pieces = copy.deepcopy(extended)  # the earlier initialisation: output rows = the mean of the pieces' rows
    with torch.no_grad():
        for t, i in zip(chosen, ids, strict=True):
            pieces.lm_head.weight[i] = pieces.lm_head.weight[list(t.base_ids)].mean(dim=0)
    assert new_mass(pieces) > len(ids) / len(base)
