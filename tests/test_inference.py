import json

import numpy as np
import pytest
import torch
from transformers import BertForQuestionAnswering

from pruning import masks, squad
from pruning.inference import (Answer, RecordError, answer, answer_batch, answer_records, check_records,
                               count_windows, run_windows, torch_runner)
from pruning.tokenizer import load_tokenizer

CONTEXT = ("The Amazon rainforest covers much of the Amazon basin of South America. The basin spans seven million "
           "square kilometres, of which five and a half million are covered by the rainforest. The region includes "
           "territory belonging to nine nations, and Brazil holds the majority of the forest.")


@pytest.fixture
def tiny_qa_model(tiny_bert_config):
    torch.manual_seed(0)
    return BertForQuestionAnswering(tiny_bert_config).eval()


def _consistent(result: Answer, context: str) -> bool:
    return bool(result.text) and context[result.start:result.end] == result.text and 0 <= result.start < result.end


def test_answer_is_the_best_span_of_the_context(tiny_qa_model, tokenizer):
    question = "Which country holds most of the forest?"
    result = answer(tiny_qa_model, tokenizer, question, CONTEXT, max_answer_length=8)
    assert isinstance(result, Answer)
    assert _consistent(result, CONTEXT)
    assert len(tokenizer.tokenize(result.text)) <= 8
    # The score is the start logit of its first token plus the end logit of its last, and no span of at most 8
    # context tokens scores higher (one window: the context is short).
    features = squad.prepare_eval_features([squad.Example("0", "", CONTEXT, question)], tokenizer, 384, 128)
    assert len(features) == 1
    with torch.inference_mode():
        logits = tiny_qa_model(input_ids=features.input_ids, attention_mask=features.attention_mask,
                               token_type_ids=features.token_type_ids)
    start, end = logits.start_logits[0].numpy(), logits.end_logits[0].numpy()
    offsets = features.offsets[0]
    context = np.flatnonzero(features.context_mask[0])
    first = next(i for i in context if offsets[i, 0] == result.start)
    last = next(i for i in context if offsets[i, 1] == result.end)
    assert result.score == pytest.approx(float(start[first] + end[last]), abs=1e-4)
    best = max(start[i] + end[j] for i in context for j in context if i <= j < i + 8)
    assert result.score == pytest.approx(float(best), abs=1e-4)


def test_answers_are_the_spans_a_model_marks(answer_key_model, tokenizer, known_answers):
    """A model whose best span is known: the windows, offsets and span search give back exactly that text, in
    one window or several, alone or in a batch."""
    questions = [e.question for e in known_answers]
    contexts = [e.context for e in known_answers]
    gold = [e.answers[0] for e in known_answers]
    for max_seq_length, doc_stride in ((384, 128), (64, 16)):
        batch = answer_batch(answer_key_model, tokenizer, questions, contexts, max_seq_length=max_seq_length,
                             doc_stride=doc_stride)
        assert [a.text for a in batch] == gold
        assert [context[a.start:a.end] for a, context in zip(batch, contexts)] == gold
    assert answer(answer_key_model, tokenizer, questions[0], contexts[0]).text == gold[0]
    # A context without its answer gets another span: the model knows spans, not questions.
    assert answer(answer_key_model, tokenizer, questions[0], contexts[1]).text == gold[1]


def test_long_context_in_several_windows(tiny_qa_model, tokenizer):
    context = " ".join([CONTEXT] * 4)
    question = "How large is the basin?"
    result = answer(tiny_qa_model, tokenizer, question, context, max_seq_length=48, doc_stride=16)
    assert _consistent(result, context)
    features = squad.prepare_eval_features([squad.Example("0", "", context, question)], tokenizer, 48, 16)
    assert len(features) > 3


def test_batch_matches_single_answers_and_evaluation(tiny_qa_model, tokenizer, dev_subset):
    examples = dev_subset[:5]
    questions = [ex.question for ex in examples]
    contexts = [ex.context for ex in examples]
    batch = answer_batch(tiny_qa_model, tokenizer, questions, contexts, max_seq_length=96, doc_stride=32)
    assert len(batch) == len(examples)
    for result, question, context in zip(batch, questions, contexts):
        assert _consistent(result, context)
        single = answer(tiny_qa_model, tokenizer, question, context, max_seq_length=96, doc_stride=32)
        assert (single.text, single.start, single.end) == (result.text, result.start, result.end)
        assert single.score == pytest.approx(result.score, abs=1e-5)
    # the same windows and span search as evaluation
    predictions = squad.predict(tiny_qa_model, tokenizer, examples, max_seq_length=96, doc_stride=32, progress=False)
    assert [predictions[ex.id] for ex in examples] == [result.text for result in batch]


def test_a_tokenizer_that_leaves_out_token_type_ids_answers_the_same(tiny_qa_model, tokenizer, tmp_path):
    # Some BERT tokenizers are saved with model_input_names that name no token_type_ids.
    tokenizer.save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    settings["model_input_names"] = ["input_ids", "attention_mask"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    plain = load_tokenizer(tmp_path)
    assert "token_type_ids" not in plain("Who?", "Ann.")
    question, context = "How large is the basin?", " ".join([CONTEXT] * 3)
    ours = answer(tiny_qa_model, plain, question, context, max_seq_length=64, doc_stride=16)
    theirs = answer(tiny_qa_model, tokenizer, question, context, max_seq_length=64, doc_stride=16)
    assert (ours.text, ours.start, ours.end, ours.score) == (theirs.text, theirs.start, theirs.end, theirs.score)


def test_masked_model(tiny_bert_config, tokenizer):
    torch.manual_seed(1)
    model = masks.apply_masks_(BertForQuestionAnswering(tiny_bert_config), "topk", attention_block=(16, 16))
    masks.set_threshold(model, 0.5)
    model.train()
    result = answer(model, tokenizer, "Which country holds most of the forest?", CONTEXT)
    assert _consistent(result, CONTEXT)
    assert model.training


@pytest.mark.parametrize("question, context, message", [
    ("", CONTEXT, "question is empty"),
    ("Who?", "", "context is empty"),
    ("   ", CONTEXT, "question is empty"),
    ("Who?", " \n", "context is empty"),
    (None, CONTEXT, "question must be a string"),
    ("Who?", b"bytes", "context must be a string"),
])
def test_answer_rejects_bad_input(tiny_qa_model, tokenizer, question, context, message):
    with pytest.raises(ValueError, match=message):
        answer(tiny_qa_model, tokenizer, question, context)


def test_answer_batch_rejects_bad_input(tiny_qa_model, tokenizer):
    with pytest.raises(ValueError, match="2 questions but 1 contexts"):
        answer_batch(tiny_qa_model, tokenizer, ["Who?", "What?"], [CONTEXT])
    with pytest.raises(ValueError, match="record 1: context is empty"):
        answer_batch(tiny_qa_model, tokenizer, ["Who?", "What?"], [CONTEXT, ""])
    with pytest.raises(ValueError, match="lists of strings"):
        answer_batch(tiny_qa_model, tokenizer, "Who?", CONTEXT)
    assert answer_batch(tiny_qa_model, tokenizer, [], []) == []


# --- checking records before any model work -------------------------------------------------------------------

@pytest.mark.parametrize("max_seq_length, doc_stride", [(48, 16), (64, 32), (96, 8), (384, 128)])
def test_count_windows_is_the_number_of_evaluation_windows(tokenizer, dev_subset, max_seq_length, doc_stride):
    for k, example in enumerate(dev_subset[:8]):
        context = " ".join([example.context] * (1 + k % 3))[: 150 + 97 * k]
        windows = count_windows(tokenizer, example.question, context, max_seq_length, doc_stride)
        features = squad.prepare_eval_features([squad.Example("0", "", context, example.question)], tokenizer,
                                               max_seq_length, doc_stride)
        assert windows == len(features)
        # The limit is inclusive: exactly that many windows pass, one fewer is refused.
        assert count_windows(tokenizer, example.question, context, max_seq_length, doc_stride, windows) == windows
        if windows > 1:
            with pytest.raises(RecordError, match="context is too long") as refused:
                count_windows(tokenizer, example.question, context, max_seq_length, doc_stride, windows - 1, index=k)
            assert (refused.value.index, refused.value.field) == (k, "context")


class _CountingTokenizer:
    """The real tokenizer, noting how many characters it was asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.characters = 0

    def __call__(self, text, *args, **kwargs):
        self.characters += sum(map(len, [text] if isinstance(text, str) else text))
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_an_oversized_context_is_refused_from_a_prefix(tokenizer):
    context = " ".join(["rainforest"] * 200_000)
    counting = _CountingTokenizer(tokenizer)
    with pytest.raises(RecordError, match=r"^record 3: context is too long: more than 64 windows of 384 tokens"):
        count_windows(counting, "Where?", context, 384, 128, max_windows=64, index=3)
    assert 0 < counting.characters < len(context) / 5
    # A long question is cut to max_query_length tokens from a prefix of it.
    counting.characters = 0
    question = " ".join(["why"] * 100_000)
    assert count_windows(counting, question, "A short context.", 384, 128, max_windows=64) == 1
    assert 0 < counting.characters < len(question) / 5
    # One that, cut, still leaves no more than doc_stride context tokens is refused, naming the question.
    with pytest.raises(RecordError, match=r"^question is too long: more than 60 tokens .*max_query_length 64"):
        count_windows(counting, question, "A short context.", 128, 64, max_windows=64)


@pytest.mark.parametrize("unit", ["a.", "中", "word\u00a0"], ids=["punctuation", "cjk", "nbsp"])
def test_a_text_without_spaces_is_refused_or_cut_from_a_prefix_too(tokenizer, unit):
    """Prefixes were cut at ASCII whitespace alone: a context of 1 MB of "a.a.a." (or Chinese, or words joined by
    non-breaking spaces) was tokenized whole, with offsets, before it was refused: 0.5 GB of a server's memory and
    3 s per megabyte of a request refused anyway. A prefix is now cut inside a word where no whitespace is near."""
    counting = _CountingTokenizer(tokenizer)
    context = unit * (1_000_000 // len(unit))
    with pytest.raises(RecordError, match=r"^record 0: context is too long: more than 64 windows of 384 tokens"):
        count_windows(counting, "Where?", context, 384, 128, max_windows=64, index=0)
    assert 0 < counting.characters < len(context) / 5
    # A question of such text is cut to its first 64 tokens, as the whole question's tokens would cut it.
    question = unit * (40_000 // len(unit))
    counting.characters = 0
    cut = squad.cut_question(counting, question, 64)
    assert 0 < counting.characters < len(question) / 5
    offsets = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(offsets) > 64 and cut == question[:offsets[63][1]].rstrip()
    # Below the cap, the count is exact: a text cut inside a word is counted whole in the end.
    shorter = unit * (3_000 // len(unit))
    windows = count_windows(tokenizer, "Where?", shorter, 128, 32, max_windows=1000)
    assert windows == len(squad.prepare_eval_features([squad.Example("0", "", shorter, "Where?")], tokenizer, 128,
                                                      32))
    assert windows > 3


def test_a_long_question_is_cut_as_in_evaluation(tiny_qa_model, tokenizer, caplog):
    question = "Which country holds most of the forest? " * 40
    cut = squad.cut_question(tokenizer, question, 64)
    assert len(tokenizer(cut, add_special_tokens=False)["input_ids"]) == 64
    with caplog.at_level("WARNING", logger="pruning.squad"):
        long = answer(tiny_qa_model, tokenizer, question, CONTEXT, max_seq_length=96, doc_stride=16)
    assert "1 of 1 questions have more than max_query_length (64) tokens" in caplog.text
    assert long == answer(tiny_qa_model, tokenizer, cut, CONTEXT, max_seq_length=96, doc_stride=16)
    assert _consistent(long, CONTEXT)
    context = " ".join([CONTEXT] * 3)
    features = squad.prepare_eval_features([squad.Example("0", "", context, question)], tokenizer, 96, 16)
    assert count_windows(tokenizer, question, context, 96, 16) == len(features) > 1
    # A shorter max_query_length leaves more context in each window.
    assert count_windows(tokenizer, question, context, 96, 16, max_query_length=8) < len(features)


@pytest.mark.parametrize("question, context, field, problem", [
    ("Who?", "", "context", "is empty"),
    (None, CONTEXT, "question", "must be a string, got null"),
    ("Who?", None, "context", "must be a string, got null"),
    (" \t", CONTEXT, "question", "is empty"),
    (7, CONTEXT, "question", "must be a string, got int"),
    ("Who?", "\u200b", "context", "has no tokens"),
    ("Who won \ud83d?", CONTEXT, "question", "holds a lone surrogate \\ud83d at character 8"),
    ("Who?", "Ann \udcff wrote it.", "context", "holds a lone surrogate \\udcff at character 4"),
    ("Who?", " ".join([CONTEXT] * 40), "context", "is too long"),
])
def test_a_bad_record_is_named_and_nothing_runs(tiny_qa_model, tokenizer, question, context, field, problem):
    calls = []
    runner = torch_runner(tiny_qa_model)

    def counting(batch):
        calls.append(batch["input_ids"].shape)
        return runner(batch)

    questions = ["Which nations?", "How large?", question]
    contexts = [CONTEXT, CONTEXT, context]
    with pytest.raises(RecordError) as refused:
        answer_records(counting, tokenizer, questions, contexts, max_seq_length=96, doc_stride=32, max_windows=4)
    assert (refused.value.index, refused.value.field) == (2, field)
    assert str(refused.value).startswith(f"record 2: {field} {problem}")
    assert calls == []  # refused before any model work


# --- batching the windows of all records -----------------------------------------------------------------------

def test_windows_of_all_records_run_in_batches_in_order(tiny_qa_model, tokenizer, dev_subset):
    examples = dev_subset[:12]
    questions = [ex.question for ex in examples]
    contexts = [ex.context[: 120 + 90 * (i % 5)] for i, ex in enumerate(examples)]  # windows of many lengths
    runner = torch_runner(tiny_qa_model)
    batches = []

    def counting(batch):
        batches.append(batch["attention_mask"].sum(dim=1))
        assert batch["input_ids"].shape == (len(batches[-1]), int(batches[-1].max()))  # cut to its longest window
        return runner(batch)

    batched = answer_records(counting, tokenizer, questions, contexts, max_seq_length=64, doc_stride=16,
                             batch_size=8)
    windows = sum(check_records(tokenizer, questions, contexts, 64, 16))
    assert windows > 16
    assert sum(len(lengths) for lengths in batches) == windows
    assert len(batches) < windows / 2  # batched: far fewer calls than windows
    for lengths in batches:  # at most 8 windows of similar length, longest first
        assert len(lengths) <= 8 and int(lengths.min()) >= 0.8 * int(lengths.max())
    longest = [int(lengths.max()) for lengths in batches]
    assert longest == sorted(longest, reverse=True)
    # One window per call answers the same, record by record, in the records' order.
    single = [answer(tiny_qa_model, tokenizer, q, c, max_seq_length=64, doc_stride=16)
              for q, c in zip(questions, contexts)]
    assert [(a.text, a.start) for a in batched] == [(a.text, a.start) for a in single]
    assert [a.score for a in batched] == pytest.approx([a.score for a in single], abs=1e-4)


def test_run_windows_matches_evaluation_logits(tiny_qa_model, tokenizer, dev_subset):
    features = squad.prepare_eval_features(dev_subset[:6], tokenizer, max_seq_length=64, doc_stride=16)
    expected_start, expected_end = squad.compute_logits(tiny_qa_model, features, batch_size=64, progress=False)
    start, end = run_windows(torch_runner(tiny_qa_model), features, batch_size=5)
    context = features.context_mask
    np.testing.assert_allclose(start[context], expected_start[context], atol=1e-4)
    np.testing.assert_allclose(end[context], expected_end[context], atol=1e-4)
    with pytest.raises(ValueError, match="logits of shape"):
        run_windows(lambda batch: (np.zeros((1, 1)), np.zeros((1, 1))), features, batch_size=5)


def test_windows_without_room_for_a_question_are_a_setting_error(tokenizer):
    with pytest.raises(ValueError, match="leave no room for a question") as raised:
        check_records(tokenizer, ["Who?"], [CONTEXT], max_seq_length=64, doc_stride=64)
    assert not isinstance(raised.value, RecordError)


def test_non_finite_logits_are_an_error_not_an_arbitrary_answer(tiny_qa_model, tokenizer):
    with torch.no_grad():
        tiny_qa_model.bert.encoder.layer[0].attention.self.query.weight.fill_(float("nan"))
    with pytest.raises(squad.NonFiniteLogits, match="NaN or infinite start/end logits in 1 of 1 windows"):
        answer(tiny_qa_model, tokenizer, "Which nations?", CONTEXT)


def _bpe_tokenizer(tmp_path, texts):
    """A small byte-level BPE saved and loaded as a RoBERTa tokenizer (<s> </s> <pad> are its specials)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    bpe.save_model(str(tmp_path))
    return RobertaTokenizerFast.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("family", ["wordpiece", "bpe"])
def test_special_token_literals_in_user_text_are_read_as_text(tokenizer, dev_subset, tmp_path, family):
    """A question or context holding "[SEP]", "[CLS]", "[PAD]" (or "<s>", "</s>", "<pad>") gives the model those
    characters, not the special tokens: a window holds only the special tokens of the pair template, in training,
    evaluation and the window count alike."""
    if family == "bpe":
        tokenizer = _bpe_tokenizer(tmp_path, [ex.context for ex in dev_subset])
    literals = " ".join(tokenizer.all_special_tokens)
    question = f"What is {literals}?"
    context = f"Markers {literals} appear here. " * 3
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    example = squad.Example("0", "", context, question, answers=(literals,), answer_starts=(8,))
    evaluation = squad.prepare_eval_features([example], tokenizer, 384, 128)
    train = squad.prepare_train_features([example], tokenizer, 384, 128)
    for ids, mask in ((evaluation.input_ids, evaluation.attention_mask),
                      (train["input_ids"], train["attention_mask"])):
        real = ids[0][mask[0].bool()]
        assert int(torch.isin(real, special_ids).sum()) == specials
    # The gold span covers the literals' own tokens, not one special token each.
    start, end = int(train["start_positions"][0]), int(train["end_positions"][0])
    offsets = evaluation.offsets[0]
    assert (offsets[start, 0], offsets[end, 1]) == (8, 8 + len(literals))
    assert end - start + 1 > len(tokenizer.all_special_tokens)
    long_context = context * 40
    windows = count_windows(tokenizer, question, long_context, 64, 16)
    assert windows == len(squad.prepare_eval_features([squad.Example("0", "", long_context, question)], tokenizer,
                                                      64, 16))


def test_a_context_longer_than_the_models_positions_is_answered_without_a_warning_of_indexing_errors(
        tiny_qa_model, capfd, caplog):
    """A context of 780 tokens for a model of 512 positions is read in windows, yet counting its tokens made
    transformers warn that running it through the model "will result in indexing errors" (``fineprune ask``, the
    served model, an evaluation of long contexts)."""
    from transformers import AutoTokenizer

    from pruning.resources import shipped_model_dir

    tokenizer = AutoTokenizer.from_pretrained(shipped_model_dir())  # its own once-only warnings not yet given
    context = " ".join(["It was written by Ann in Paris in 1999 after the war."] * 60)
    assert tokenizer.model_max_length == 512
    capfd.readouterr()
    result = answer(tiny_qa_model, tokenizer, "Who wrote it?", context, max_seq_length=128, doc_stride=32)
    assert _consistent(result, context)
    said = capfd.readouterr().err + caplog.text
    assert "indexing errors" not in said and "longer than the specified maximum" not in said, said


def test_windows_longer_than_the_models_positions_are_cut_to_them_as_the_command_line_cuts_them(tokenizer):
    """Called as a library with their default windows (384 tokens), ``answer`` and ``predict_spans`` stopped inside
    transformers on a model of 128 positions ("The size of tensor a (287) must match ... (128)"); ``eval``, ``ask``
    and the served model cut the windows to the model."""
    from transformers import BertConfig

    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=128,
                                                max_position_embeddings=128)).eval()
    assert squad.model_windows(model, 384, 128) == (128, 64) == squad.fit_windows(384, 128, 128)
    assert squad.model_windows(model, 96, 32) == (96, 32)  # windows that fit stay as given
    context = " ".join([CONTEXT] * 3)
    cut = answer(model, tokenizer, "How large is the basin?", context, max_seq_length=128, doc_stride=64)
    assert answer(model, tokenizer, "How large is the basin?", context) == cut
    examples = [squad.Example("a", "", context, "How large is the basin?"),
                squad.Example("b", "", CONTEXT, "Who holds the majority of the forest?")]
    spans = squad.predict_spans(model, tokenizer, examples, progress=False)
    assert spans == squad.predict_spans(model, tokenizer, examples, max_seq_length=128, doc_stride=64,
                                        progress=False)
    assert spans["a"] == cut


@pytest.mark.parametrize("separator", ["\x1c", "\x0b", "\x85"])
def test_a_prefix_is_not_cut_at_a_control_character_bert_deletes(tokenizer, separator):
    """Python counts \\x1c, \\x0b or \\x85 as whitespace, but BERT's normalizer deletes them, joining the words beside
    them: a prefix cut there was not the text's first tokens (a word of over 100 characters is one [UNK] whole, and
    many tokens cut), and a context of 3 tokens was refused as needing more windows than it does."""
    word = "qx" * 49 + "q"  # with the "." before it a word of 100 characters, joined by the separator to the tail
    text = "b" * 390 + "." + word + separator + "c" * 20
    windows = len(squad.prepare_eval_features([squad.Example("0", "", text, "Where?")], tokenizer, 64, 16))
    assert count_windows(tokenizer, "Where?", text, 64, 16, max_windows=windows, index=0) == windows
    question = "b" * 420 + "." + word + separator + "c" * 20
    assert len(tokenizer(question, add_special_tokens=False)["input_ids"]) < 64
    assert squad.cut_question(tokenizer, question, 64) == question


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has the CUDA device the test gives")
def test_a_device_this_machine_cannot_run_on_is_one_line_before_any_work(tiny_qa_model, tokenizer, tmp_path):
    """answer(), compute_logits() and load_packed() given a CUDA device the machine lacks (a notebook's
    device="cuda" on a laptop) stopped in "pin_memory=True requires a CUDA or other accelerator backend", or, for
    load_packed, blamed the weights file ("cannot be read as safetensors"). Each says the device, as the command
    line does; a name that is no device too. Other torch devices (mps) are left to torch, as before."""
    from pruning.config import ConfigError
    from pruning.packing import load_packed, pack, save_packed

    cuda = r"^device cuda(:0)?: CUDA is not available on this machine \(use cpu\)$"
    with pytest.raises(ConfigError, match=cuda):
        answer(tiny_qa_model, tokenizer, "Which country?", CONTEXT, device="cuda")
    features = squad.prepare_eval_features([squad.Example(id="q", title="", context=CONTEXT, question="Which?")],
                                           tokenizer, max_seq_length=64, doc_stride=32)
    with pytest.raises(ConfigError, match=cuda):
        squad.compute_logits(tiny_qa_model, features, device="cuda:0")
    with pytest.raises(ConfigError, match=r"^device 0: a GPU's index, and this machine has no GPU \(use cpu\)$"):
        squad.compute_logits(tiny_qa_model, features, device=0)
    save_packed(pack(tiny_qa_model), tokenizer, tmp_path / "packed")
    with pytest.raises(ConfigError, match=cuda):
        load_packed(tmp_path / "packed", device=torch.device("cuda"))
    with pytest.raises(ConfigError, match=r"^device 'gpu': not a device \(cpu, cuda, cuda:N or another torch "
                                          r"device\)$"):
        load_packed(tmp_path / "packed", device="gpu")
    assert load_packed(tmp_path / "packed", device=torch.device("cpu")) is not None


def test_a_tokenizer_of_more_ids_than_the_model_embeds_is_one_line(tokenizer):
    """Another model's tokenizer (30,522 ids for a model of 1,000) stopped 24 frames deep in torch's embedding with
    "index out of range in self"."""
    from transformers import BertConfig

    model = BertForQuestionAnswering(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64)).eval()
    said = (r"^the model's vocab_size 1000 is smaller than the tokenizer's 30522 tokens: they do not belong together "
            r"\(give the tokenizer saved with the model\)$")
    with pytest.raises(ValueError, match=said):
        answer(model, tokenizer, "Which country?", CONTEXT)
    with pytest.raises(ValueError, match=said):
        squad.predict(model, tokenizer, [squad.Example(id="q", title="", context=CONTEXT, question="Which?")],
                      progress=False)
