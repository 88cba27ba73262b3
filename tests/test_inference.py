import pytest
import torch
from transformers import BertForQuestionAnswering

from pruning import masks, squad
from pruning.inference import Answer, answer, answer_batch

CONTEXT = ("The Amazon rainforest covers much of the Amazon basin of South America. The basin spans seven million "
           "square kilometres, of which five and a half million are covered by the rainforest. The region includes "
           "territory belonging to nine nations, and Brazil holds the majority of the forest.")


@pytest.fixture
def tiny_qa_model(tiny_bert_config):
    torch.manual_seed(0)
    return BertForQuestionAnswering(tiny_bert_config).eval()


def _consistent(result: Answer, context: str) -> bool:
    return bool(result.text) and context[result.start:result.end] == result.text and 0 <= result.start < result.end


def test_answer_is_a_span_of_the_context(tiny_qa_model, tokenizer):
    result = answer(tiny_qa_model, tokenizer, "Which country holds most of the forest?", CONTEXT, max_answer_length=8)
    assert isinstance(result, Answer)
    assert _consistent(result, CONTEXT)
    assert len(tokenizer.tokenize(result.text)) <= 8
    assert result.score == pytest.approx(float(result.score))


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
