"""Model directories whose weights are not the ones their config describes are refused in one line naming the file,
never loaded with random tensors in their place; a directory's tokenizer reads its text as its files say."""

import json
import logging
import shutil

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering, BertModel

from pruning import masks
from pruning.checkpoint import CheckpointError, load_model, save_model

from conftest import handed_to_handlers


def tiny(layers=2, intermediate=128, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=intermediate, max_position_embeddings=64)
    return BertForQuestionAnswering(config).eval()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("other, says", [
    (dict(layers=1), r"missing: bert\.encoder\.layer\.1\."),
    (dict(layers=3), r"unexpected: bert\.encoder\.layer\.2\."),
    (dict(intermediate=256), r"bert\.encoder\.layer\.0\.intermediate\.dense\.bias has shape \(256,\), the config "
                             r"gives \(128,\)"),
])
def test_weights_of_another_shape_than_the_config_are_refused(tmp_path, masked, other, says):
    """A config.json copied from (or a model.safetensors written by) another model."""
    model, stranger = tiny(), tiny(**other)
    if masked:
        for m in (model, stranger):
            masks.apply_masks_(m, "sigmoid_threshold", (32, 32))
    save_model(model, None, tmp_path / "model")
    save_model(stranger, None, tmp_path / "stranger")
    shutil.copy(tmp_path / "model" / "config.json", tmp_path / "stranger" / "config.json")
    weights = tmp_path / "stranger" / "model.safetensors"
    for qa_head in (False, True):
        with pytest.raises(CheckpointError, match=rf"^{weights}: weights do not match the config \(.*{says}") as err:
            load_model(tmp_path / "stranger", qa_head=qa_head)
        assert "\n" not in str(err.value)


def test_a_file_given_for_a_model_directory_is_named_as_a_file(tmp_path):
    """A model's config.json or weights file where its directory goes was "model directory not found", while it was
    there: it is named as a file, as the command line names it; a path that is not there is still not found."""
    save_model(tiny(), None, tmp_path / "model")
    for name in ("config.json", "model.safetensors"):
        with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'model' / name}: is a file; a model directory is "
                                                  "expected$"):
            load_model(tmp_path / "model" / name)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'absent'}: model directory not found$"):
        load_model(tmp_path / "absent")


def test_a_pre_trained_encoder_still_loads_with_a_fresh_qa_head(tmp_path, caplog):
    """Its missing QA head and its pooler (which the QA model has not) are what such a checkpoint is: one line says
    the head is new, in place of transformers' table of the loading."""
    encoder = BertModel(tiny().config)  # with a pooler
    encoder.save_pretrained(tmp_path / "encoder")
    with handed_to_handlers("transformers.modeling_utils") as transformers_said, \
            caplog.at_level(logging.INFO, logger="pruning.checkpoint"):
        model = load_model(tmp_path / "encoder", fine_tune=True)
    assert not [m for m in transformers_said if "LOAD REPORT" in m], transformers_said
    assert torch.equal(model.bert.encoder.layer[1].output.dense.weight, encoder.encoder.layer[1].output.dense.weight)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "pruning.checkpoint"]
    assert said == [("INFO", f"{tmp_path / 'encoder'}: a pre-trained encoder without a question-answering head; "
                             "qa_outputs starts from random weights")], said
    # Loaded to answer questions (a notebook's load_model of the wrong directory), its random answers looked real:
    # a warning says so.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pruning.checkpoint"):
        load_model(tmp_path / "encoder")
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "pruning.checkpoint"]
    assert said == [("WARNING", f"{tmp_path / 'encoder'}: a pre-trained encoder without a question-answering head; "
                                "qa_outputs starts from random weights, and the model answers at random until it is "
                                "fine-tuned (qa_head=True refuses such a directory)")], said
    with pytest.raises(CheckpointError, match="not a question-answering model"):
        load_model(tmp_path / "encoder", qa_head=True)
    dense = tiny()
    save_model(dense, None, tmp_path / "dense")
    assert torch.equal(load_model(tmp_path / "dense", qa_head=True).qa_outputs.weight, dense.qa_outputs.weight)


# A user's own cased WordPiece vocabulary: capitals and accents are tokens of their own.
_CASED_WORDS = ["Élodie", "Zoë", "Malmö", "Apple", "apple", "works", "at", "in", "met", "Москва", "東", "京"]


def _cased_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import BertTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_CASED_WORDS])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return BertTokenizerFast(tokenizer_object=backend, do_lower_case=False, strip_accents=False)


def _tokens(tokenizer, text):
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_a_cased_tokenizer_json_saved_on_its_own_stays_cased(tmp_path):
    # tokenizer.json alone (no tokenizer_config.json), as Tokenizer.save or a copy of the one file leaves it:
    # transformers would rebuild its normalizer lower-casing and stripping accents.
    from pruning.tokenizer import load_tokenizer

    _cased_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    tokenizer = load_tokenizer(tmp_path)
    text = "Élodie met Zoë in Malmö at Apple"
    assert _tokens(tokenizer, text) == ["Élodie", "met", "Zoë", "in", "Malmö", "at", "Apple"]
    # what a run saves beside its model reads the same
    tokenizer.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "config.json").write_text('{"model_type": "bert"}')
    assert _tokens(load_tokenizer(tmp_path / "saved"), text) == _tokens(tokenizer, text)


@pytest.mark.parametrize("alone", [False, True], ids=["with-tokenizer-config", "tokenizer-json-alone"])
def test_a_tokenizer_json_keeps_its_own_pre_tokenizer(tmp_path, alone):
    # transformers rebuilt it as BERT's, which splits at punctuation: "it's" and "cat." became it ' s and cat .
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import BertTokenizerFast

    from pruning.tokenizer import load_tokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "it's", "a", "cat.", "who?", "it", "'", "s", "cat", "."]
    backend = Tokenizer(models.WordPiece({token: i for i, token in enumerate(words)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=False)
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    BertTokenizerFast(tokenizer_object=backend, do_lower_case=False).save_pretrained(tmp_path)
    if alone:
        (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    tokenizer = load_tokenizer(tmp_path)
    context = "it's a cat."
    assert _tokens(tokenizer, context) == ["it's", "a", "cat."]
    encoded = tokenizer("who?", context, return_offsets_mapping=True)
    pieces = [context[start:end] for (start, end), kind in zip(encoded["offset_mapping"], encoded.sequence_ids())
              if kind == 1]
    assert pieces == ["it's", "a", "cat."]
    # what a run saves beside its model reads the same
    tokenizer.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "config.json").write_text('{"model_type": "bert"}')
    assert _tokens(load_tokenizer(tmp_path / "saved"), context) == ["it's", "a", "cat."]


@pytest.mark.parametrize("kind", ["keeps-case-strips-accents", "none"])
def test_a_tokenizer_json_keeps_a_normalizer_of_another_kind(tmp_path, kind):
    # transformers put BERT's in its place, lower-casing with accents stripped: "Zoë" and "Apple" became [UNK]
    from tokenizers import normalizers

    from pruning.tokenizer import load_tokenizer

    tokenizer = _cased_tokenizer()
    tokenizer.backend_tokenizer.normalizer = (normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()])
                                              if kind != "none" else None)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    text = "Zoë met Élodie at Apple"
    wanted = ["[UNK]", "met", "[UNK]", "at", "Apple"] if kind != "none" else ["Zoë", "met", "Élodie", "at", "Apple"]
    loaded = load_tokenizer(tmp_path)
    assert _tokens(loaded, text) == wanted
    loaded.save_pretrained(tmp_path / "saved")  # what a run saves beside its model reads the same
    (tmp_path / "saved" / "config.json").write_text('{"model_type": "bert"}')
    assert _tokens(load_tokenizer(tmp_path / "saved"), text) == wanted
    # a tokenizer_config.json that gives the casing still decides, as in transformers
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    assert _tokens(load_tokenizer(tmp_path), text) == ["[UNK]", "met", "[UNK]", "at", "apple"]


@pytest.mark.parametrize("setting", ["padding_side", "truncation_side"])
def test_the_windows_are_the_same_whatever_side_tokenizer_config_gives(tmp_path, tokenizer, dev_subset, setting):
    """The windows pad after their tokens and cut the context from its end: a tokenizer_config.json with
    ``padding_side: left`` stopped every command (and every request of a served model) with a traceback, one with
    ``truncation_side: left`` cut the first window from the context's end and scored other windows."""
    from pruning import squad
    from pruning.tokenizer import load_tokenizer

    for name in ("right", "left"):
        tokenizer.save_pretrained(tmp_path / name)
        (tmp_path / name / "config.json").write_text('{"model_type": "bert"}')
    settings = json.loads((tmp_path / "left" / "tokenizer_config.json").read_text())
    (tmp_path / "left" / "tokenizer_config.json").write_text(json.dumps({**settings, setting: "left"}))
    example = max(dev_subset, key=lambda e: len(e.context))
    windows = [squad.prepare_eval_features([example], load_tokenizer(tmp_path / name), max_seq_length=64,
                                           doc_stride=24) for name in ("right", "left")]
    assert len(windows[0]) > 2
    assert all((getattr(windows[0], field) == getattr(windows[1], field)).all()
               for field in ("input_ids", "attention_mask", "offsets"))


def test_tokenizer_config_still_decides_the_casing(tmp_path):
    from pruning.tokenizer import load_tokenizer

    _cased_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    assert _tokens(load_tokenizer(tmp_path), "Zoë works") == ["Zoë", "works"]
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    settings.update(do_lower_case=True, strip_accents=None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    assert _tokens(load_tokenizer(tmp_path), "Zoë works") == ["[UNK]", "works"]


def test_a_cased_vocab_txt_read_lower_cased_is_said(tmp_path, caplog):
    from pruning.tokenizer import load_tokenizer

    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_CASED_WORDS]
    (tmp_path / "vocab.txt").write_text("".join(f"{word}\n" for word in words), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="pruning.checkpoint"):
        load_tokenizer(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(tmp_path / "vocab.txt") in warnings[0] and "do_lower_case" in warnings[0]
    # an uncased vocabulary (the shipped one's words) is read without a word
    caplog.clear()
    uncased = [*words[:5], "elodie", "zoe", "malmo", "apple", "works", "москва", "京"]
    (tmp_path / "vocab.txt").write_text("".join(f"{word}\n" for word in uncased), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="pruning.checkpoint"):
        load_tokenizer(tmp_path)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("config, says", [
    ({"strip_accents": False}, "it lower-cases (do_lower_case true, by default: no tokenizer file gives it)"),
    ({"do_lower_case": True, "strip_accents": None},
     "it lower-cases (do_lower_case true, in tokenizer_config.json) and strips accents (strip_accents null, which "
     "follows do_lower_case, in tokenizer_config.json)"),
    ({"do_lower_case": False, "strip_accents": True}, "strips accents (strip_accents true, in tokenizer_config.json)"),
], ids=["config-without-casing", "config-lower-casing", "config-stripping-accents"])
def test_a_cased_vocab_txt_read_lower_cased_is_said_whatever_file_gave_the_settings(tmp_path, caplog, config, says):
    # a tokenizer_config.json without do_lower_case left the cased vocab.txt read lower-cased without a word
    from pruning.tokenizer import load_tokenizer

    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_CASED_WORDS]
    (tmp_path / "vocab.txt").write_text("".join(f"{word}\n" for word in words), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="pruning.checkpoint"):
        load_tokenizer(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"{tmp_path / 'vocab.txt'}: "), warnings
    assert says in warnings[0] and "in tokenizer_config.json" in warnings[0]


def test_a_cased_tokenizer_json_that_lower_cases_is_said_and_the_shipped_model_is_not(tmp_path, caplog):
    from tokenizers import normalizers

    from pruning.resources import shipped_model_dir
    from pruning.tokenizer import load_tokenizer

    tokenizer = _cased_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "vocab.txt").unlink(missing_ok=True)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with caplog.at_level(logging.WARNING, logger="pruning.checkpoint"):
        load_tokenizer(tmp_path)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and warnings[0].startswith(f"{tmp_path / 'tokenizer.json'}: "), warnings
        assert "lower-cases (do_lower_case true, from tokenizer.json's normalizer)" in warnings[0]
        caplog.clear()
        # a normalizer of another kind gives no do_lower_case: transformers' default does
        tokenizer.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.NFC()])
        tokenizer.save_pretrained(tmp_path)
        (tmp_path / "tokenizer_config.json").write_text('{"strip_accents": false}')
        load_tokenizer(tmp_path)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "lower-cases (do_lower_case true, by default" in warnings[0], warnings
        caplog.clear()
        load_tokenizer(shipped_model_dir())  # uncased: its vocabulary holds no capitals
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("file, content, says", [
    ("tokenizer_config.json", '{"do_lower_case": "false"}', "do_lower_case must be true or false, got 'false'"),
    ("tokenizer_config.json", '{"strip_accents": 0}', "strip_accents must be true or false, got 0"),
    ("tokenizer_config.json", "[]", "expected a JSON object, got list"),
    ("tokenizer_config.json", '{"do_lower_case": ', "not valid JSON"),
    ("tokenizer.json", '{"normalizer": ', "not valid JSON"),
    ("tokenizer_config.json", '{"model_max_length": "512"}', "model_max_length must be a number, got '512'"),
], ids=["string-for-a-boolean", "number-for-a-boolean", "not-an-object", "config-cut-short", "tokenizer-cut-short",
        "string-for-a-length"])
def test_a_malformed_tokenizer_file_is_one_line_naming_it(tmp_path, file, content, says):
    # a hand-written tokenizer_config.json ("false" in quotes) failed inside transformers with a traceback
    from pruning.tokenizer import load_tokenizer

    _cased_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / file).write_text(content)
    with pytest.raises(CheckpointError) as caught:
        load_tokenizer(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / file}: ") and says in message and "\n" not in message


def test_a_tokenizer_json_without_an_entry_it_needs_is_one_line(tmp_path):
    # valid JSON of an unexpected shape: transformers' KeyError ended the command in a traceback
    from pruning.tokenizer import load_tokenizer

    _cased_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    recorded = json.loads((tmp_path / "tokenizer.json").read_text())
    del recorded["added_tokens"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(recorded))
    with pytest.raises(CheckpointError) as caught:
        load_tokenizer(tmp_path)
    assert str(caught.value) == f"{tmp_path}: no usable tokenizer files (no 'added_tokens' entry)"


@pytest.mark.parametrize("lower", [True, False], ids=["lower-cased", "cased"])
def test_the_casing_warning_counts_every_token_the_normalizer_changes(tmp_path, caplog, lower):
    # the check normalizes only tokens that are not plain ASCII; its count is that of normalizing every one
    from tokenizers import normalizers

    from pruning.tokenizer import load_tokenizer

    odd = ["Hello", "hello", "HELLO", "é", "Zoë", "東京", "東", "a\x7fb", "a\u200bb", "[x]", "@", "~tilde", "`",
           "_", "{}", "Ⅻ", "ǅ", "ß", "İ", "ﬁ", "##Abc", "##abc", "a\u0301"]
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "q", "c", *odd]
    (tmp_path / "vocab.txt").write_text("".join(f"{word}\n" for word in words), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower}))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    normalizer = normalizers.BertNormalizer(lowercase=lower)
    pieces = [word.removeprefix("##") for word in words[5:]]
    changed = [piece for piece in pieces if normalizer.normalize_str(piece).strip() != piece]
    with caplog.at_level(logging.WARNING, logger="pruning.checkpoint"):
        load_tokenizer(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f": {len(changed)} of its {len(pieces)} tokens (e.g. " in warnings[0], warnings


@pytest.mark.parametrize("part, field, value, says", [
    ("model", "max_input_chars_per_word", "100", 'model: invalid type: string "100", expected usize'),
    ("model", "continuing_subword_prefix", 2, "model: invalid type: integer `2`, expected a string"),
    ("decoder", "prefix", None, "decoder: data did not match any variant"),
], ids=["word-limit-in-quotes", "prefix-a-number", "decoder-prefix-null"])
def test_a_tokenizer_json_field_of_the_wrong_type_is_one_line_naming_it(tmp_path, part, field, value, says):
    # the tokenizers library's refusal came out of transformers as a traceback
    from tokenizers import decoders

    from pruning.tokenizer import load_tokenizer

    tokenizer = _cased_tokenizer()
    tokenizer.backend_tokenizer.decoder = decoders.WordPiece()
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    recorded = json.loads((tmp_path / "tokenizer.json").read_text())
    recorded[part][field] = value
    (tmp_path / "tokenizer.json").write_text(json.dumps(recorded))
    with pytest.raises(CheckpointError) as caught:
        load_tokenizer(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'tokenizer.json'}: not a tokenizer file (") and says in message
    assert "\n" not in message


# A WordPiece vocabulary whose word pieces are marked "@@" (not BERT's "##"), and a word of 24 characters.
_PIECES = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "who", "wrote", "the", "play", "in", "which", "year", "?", ".",
           ",", "shake", "@@speare", "@@s", "@@ing", "@@ed", "play", "write", "act", "hamlet", "in", "1600", "he",
           "a", "@@a", "@@b", "@@c", "b", "c", "sing", "s", "##s", "##ing", "##speare", "antidisestablishmentism"]


def _word_piece_dir(path, config, prefix="@@", longest=20, unk="[UNK]", decoder_cleanup=False):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import BertTokenizerFast

    vocab = {}
    for token in _PIECES:
        vocab.setdefault(unk if token == "[UNK]" else token, len(vocab))
    backend = Tokenizer(models.WordPiece(vocab, unk_token=unk, continuing_subword_prefix=prefix,
                                         max_input_chars_per_word=longest))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix=prefix, cleanup=decoder_cleanup)
    BertTokenizerFast(tokenizer_object=backend, unk_token=unk).save_pretrained(path)
    if not config:
        (path / "tokenizer_config.json").unlink()
    (path / "config.json").write_text('{"model_type": "bert"}')
    return path


_QUESTION = "Who wrote the play, in which year?"
_CONTEXT = ("Shakespeare wrote Hamlet in 1600 . He acted , singing plays ; antidisestablishmentism abc . " * 3).strip()


def _reads_as_its_file(tokenizer, path):
    """``tokenizer`` gives what the tokenizers library gives from ``path``'s tokenizer.json: tokens, ids, type ids
    and offsets of a text, of a question-context pair and of its SQuAD windows, and the decoded text."""
    from tokenizers import Tokenizer

    from pruning.squad import tokenize_text

    own = Tokenizer.from_file(str(path / "tokenizer.json"))
    own.encode_special_tokens = True  # as tokenize_text reads questions and contexts
    for texts in [(_CONTEXT,), (_QUESTION, _CONTEXT)]:
        wanted = own.encode(*texts)
        got = tokenize_text(tokenizer, *texts, return_offsets_mapping=True, return_token_type_ids=True)
        assert tokenizer.convert_ids_to_tokens(got["input_ids"]) == wanted.tokens
        assert got["input_ids"] == wanted.ids and got["token_type_ids"] == wanted.type_ids
        assert [tuple(o) for o in got["offset_mapping"]] == wanted.offsets
    own.enable_truncation(24, stride=6, strategy="only_second")
    wanted = own.encode(_QUESTION, _CONTEXT)
    wanted = [wanted, *wanted.overflowing]
    got = tokenize_text(tokenizer, [_QUESTION], [_CONTEXT], truncation="only_second", max_length=24, stride=6,
                        return_overflowing_tokens=True, return_offsets_mapping=True, return_token_type_ids=True)
    assert len(got["input_ids"]) == len(wanted) > 2
    for i, window in enumerate(wanted):
        assert got["input_ids"][i] == window.ids and got["token_type_ids"][i] == window.type_ids
        assert [tuple(o) for o in got["offset_mapping"][i]] == window.offsets
        assert got.sequence_ids(i) == window.sequence_ids
    own.no_truncation()
    ids = own.encode(_CONTEXT, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == own.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("config", [True, False], ids=["with-tokenizer-config", "tokenizer-json-alone"])
def test_a_tokenizer_json_keeps_its_own_word_pieces_and_decoder(tmp_path, config):
    # transformers rebuilt its WordPiece as BERT's ("##" pieces, words of up to 100 characters) with BERT's decoder:
    # "Shakespeare" became shake ##speare, "antidisestablishmentism" a token though the file says [UNK]
    from pruning.tokenizer import load_tokenizer

    path = _word_piece_dir(tmp_path / "own", config)
    tokenizer = load_tokenizer(path)
    assert tokenizer.tokenize("Shakespeare antidisestablishmentism") == ["shake", "@@speare", "[UNK]"]
    _reads_as_its_file(tokenizer, path)
    tokenizer.save_pretrained(tmp_path / "saved")  # what a run saves beside its model reads the same
    (tmp_path / "saved" / "config.json").write_text('{"model_type": "bert"}')
    _reads_as_its_file(load_tokenizer(tmp_path / "saved"), path)
    # BERT's own settings read as before
    path = _word_piece_dir(tmp_path / "bert", config, prefix="##", longest=100, decoder_cleanup=True)
    assert load_tokenizer(path).tokenize("Shakespeare antidisestablishmentism") == ["shake", "##speare",
                                                                                    "antidisestablishmentism"]
    _reads_as_its_file(load_tokenizer(path), path)


@pytest.mark.parametrize("config", [None, "{}", '{"do_lower_case": true}'],
                         ids=["tokenizer-json-alone", "empty-config", "config-without-unk"])
def test_a_tokenizer_json_keeps_its_own_unknown_token(tmp_path, config):
    # transformers built its WordPiece with "[UNK]", which its vocabulary lacks: the tokenizers library's traceback
    # ("Missing [UNK] token from the vocabulary") at the first unknown word, in training, eval or serving
    from pruning.tokenizer import load_tokenizer

    path = _word_piece_dir(tmp_path / "own", config=False, unk="<unk>")
    if config is not None:
        (path / "tokenizer_config.json").write_text(config)
    tokenizer = load_tokenizer(path)
    assert tokenizer.unk_token == "<unk>" and tokenizer.tokenize("hamlet zzz") == ["hamlet", "<unk>"]
    assert "[UNK]" not in tokenizer.get_vocab()
    _reads_as_its_file(tokenizer, path)
    tokenizer.save_pretrained(tmp_path / "saved")  # what a run saves beside its model reads the same
    (tmp_path / "saved" / "config.json").write_text('{"model_type": "bert"}')
    _reads_as_its_file(load_tokenizer(tmp_path / "saved"), path)


@pytest.mark.parametrize("file", ["tokenizer_config.json", "special_tokens_map.json", "vocab.txt"])
def test_an_unknown_token_the_vocabulary_lacks_is_one_line_naming_the_file(tmp_path, file):
    # the tokenizer loaded, and the first word outside the vocabulary stopped the run with a traceback
    from pruning.tokenizer import load_tokenizer

    path = _word_piece_dir(tmp_path, config=True, unk="<unk>")
    if file == "vocab.txt":  # a vocab.txt alone: transformers' "[UNK]"
        vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (path / name).unlink(missing_ok=True)
        (path / "vocab.txt").write_text("".join(f"{token}\n" for token in sorted(vocab, key=vocab.get)))
        says = "the vocabulary has no unknown token '[UNK]' (transformers' default where no file names one)"
    else:
        settings = json.loads((path / "tokenizer_config.json").read_text())
        settings.pop("unk_token")
        (path / "tokenizer_config.json").write_text(json.dumps(settings))
        given = json.loads((path / file).read_text()) if (path / file).is_file() else {}
        (path / file).write_text(json.dumps({**given, "unk_token": "[UNK]"}))
        says = "unk_token '[UNK]' is not in the vocabulary of tokenizer.json (its own is '<unk>')"
    with pytest.raises(CheckpointError) as caught:
        load_tokenizer(path)
    message = str(caught.value)
    assert message.startswith(f"{path / file}: ") and says in message and "\n" not in message, message


def _with_template(path, pair, special_tokens):
    from tokenizers import processors

    template = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair=pair, special_tokens=special_tokens)
    recorded = json.loads((path / "tokenizer.json").read_text())
    recorded["post_processor"] = json.loads(template.__getstate__())
    (path / "tokenizer.json").write_text(json.dumps(recorded))
    return path


@pytest.mark.parametrize("config", [True, False], ids=["with-tokenizer-config", "tokenizer-json-alone"])
@pytest.mark.parametrize("pair", ["[CLS] $A [SEP] $B [SEP]", "[CLS] $A [SEP] [SEP] $B:1 [SEP]:1"],
                         ids=["one-token-type", "two-seps"])
def test_a_tokenizer_json_keeps_its_own_post_processor(tmp_path, config, pair):
    # transformers rebuilt it as BERT's [CLS] A [SEP] B:1 [SEP]:1: a model of one token type (type_vocab_size 1)
    # met type id 1 (index out of range), and a model trained with two [SEP] between the texts windows without them
    from transformers import BertConfig, BertForQuestionAnswering

    from pruning.squad import Example, prepare_eval_features
    from pruning.tokenizer import load_tokenizer

    path = _with_template(_word_piece_dir(tmp_path / "own", config), pair, [("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = load_tokenizer(path)
    _reads_as_its_file(tokenizer, path)
    tokenizer.save_pretrained(tmp_path / "saved")  # what a run saves beside its model reads the same
    (tmp_path / "saved" / "config.json").write_text('{"model_type": "bert"}')
    _reads_as_its_file(load_tokenizer(tmp_path / "saved"), path)
    if "$B [SEP]" in pair:
        torch.manual_seed(0)
        model = BertForQuestionAnswering(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=64, type_vocab_size=1)).eval()
        # every window, not only a context's first, as the tokenizers library gives them (tokenizers#1908)
        windows = prepare_eval_features([Example("x", "", _CONTEXT, _QUESTION)], tokenizer, max_seq_length=32,
                                        doc_stride=8)
        assert len(windows.input_ids) > 2 and (windows.token_type_ids == 0).all()
        with torch.no_grad():
            model(input_ids=windows.input_ids, token_type_ids=windows.token_type_ids,
                  attention_mask=windows.attention_mask)


def test_a_post_processor_that_does_not_put_the_cls_token_first_is_one_line_naming_it(tmp_path):
    from pruning.tokenizer import load_tokenizer

    path = _with_template(_word_piece_dir(tmp_path, config=True), "[SEP] $A [CLS] $B:1 [SEP]:1",
                          [("[CLS]", 2), ("[SEP]", 3)])
    with pytest.raises(CheckpointError) as caught:
        load_tokenizer(path)
    message = str(caught.value)
    assert message.startswith(f"{path / 'tokenizer.json'}: its post_processor puts '[SEP]' first in a "
                              "question-context pair, not the CLS token '[CLS]'") and "\n" not in message


def test_a_saved_model_does_not_record_the_directory_it_was_read_from(tmp_path):
    """save_model wrote config.json's ``_name_or_path``, the path of the directory its model was read from on this
    machine, into every checkpoint and final model (and so into the registry's copies), where transformers' own
    save_pretrained leaves it out."""
    source = tmp_path / "a user's models" / "dense"
    save_model(tiny(), None, source)
    model = load_model(source, qa_head=True)
    assert model.config.name_or_path == str(source)
    save_model(model, None, tmp_path / "final")
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert "_name_or_path" not in config and str(source) not in json.dumps(config)
    assert torch.equal(load_model(tmp_path / "final", qa_head=True).qa_outputs.weight, model.qa_outputs.weight)


def _shard(model, model_dir, max_shard_size="50KB"):
    """Replace the model.safetensors of ``model``'s saved directory by the shards and index that
    ``save_pretrained(dir, max_shard_size=...)`` writes."""
    model.save_pretrained(model_dir / "shards", max_shard_size=max_shard_size)
    (model_dir / "model.safetensors").unlink()
    for path in (model_dir / "shards").glob("model*.safetensors*"):
        path.rename(model_dir / path.name)
    shutil.rmtree(model_dir / "shards")
    shards = sorted(model_dir.glob("model-*.safetensors"))
    assert len(shards) > 1 and (model_dir / "model.safetensors.index.json").is_file()
    return shards


@pytest.mark.parametrize("masked", [False, True])
def test_sharded_weights_load_as_transformers_loads_them(tmp_path, masked):
    """save_pretrained(dir, max_shard_size=...) writes model.safetensors.index.json and shards, which
    from_pretrained opens: a dense or masked directory stored so loads with the same logits."""
    model = tiny()
    if masked:
        masks.apply_masks_(model, "sigmoid_threshold", (32, 32))
    whole = save_model(model, None, tmp_path / "whole")
    sharded = save_model(model, None, tmp_path / "sharded")
    _shard(model, sharded)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = load_model(whole)(input_ids=ids)
    loaded = load_model(sharded, qa_head=True)
    assert masks.is_masked(loaded) == masked
    out = loaded(input_ids=ids)
    assert torch.equal(out.start_logits, expected.start_logits) and torch.equal(out.end_logits, expected.end_logits)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("damage, file, says", [
    ("index not json", "model.safetensors.index.json", "not a safetensors index"),
    ("index without weight_map", "model.safetensors.index.json", "not a safetensors index"),
    ("shard missing", "model-00002-of-", "weights file not found (named in model.safetensors.index.json)"),
    ("shard corrupted", "model-00002-of-", "cannot be read as safetensors"),
    ("tensor placed in another shard", "model-00001-of-", "which model.safetensors.index.json does not place there"),
])
def test_a_damaged_sharded_directory_is_one_line_naming_the_file(tmp_path, masked, damage, file, says):
    model = tiny()
    if masked:
        masks.apply_masks_(model, "sigmoid_threshold", (32, 32))
    directory = save_model(model, None, tmp_path / "model")
    shards = _shard(model, directory)
    index_file = directory / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    if damage == "index not json":
        index_file.write_text("{ not json")
    elif damage == "index without weight_map":
        index_file.write_text(json.dumps({"metadata": index["metadata"]}))
    elif damage == "shard missing":
        shards[1].unlink()
    elif damage == "shard corrupted":
        shards[1].write_bytes(shards[1].read_bytes()[:100])
    else:  # the index says a tensor of the first shard is in the second
        name = next(k for k, v in index["weight_map"].items() if v == shards[0].name)
        index["weight_map"][name] = shards[1].name
        index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as caught:
        load_model(directory)
    message = str(caught.value)
    assert message.startswith(str(directory / file)) and says in message and "\n" not in message


def test_pickled_weights_are_refused_in_one_line_never_unpickled(tmp_path):
    """pytorch_model.bin is a pickle, which can run any code as it is read: a directory holding only such weights is
    refused, and one holding model.safetensors as well is read from that."""
    import pickle

    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    model = tiny()
    directory = save_model(model, None, tmp_path / "model")
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(load_model(directory)(input_ids=ids).start_logits, model(input_ids=ids).start_logits)
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as caught:
        load_model(directory)
    message = str(caught.value)
    assert message.startswith(f"{directory / 'pytorch_model.bin'}: pickled PyTorch weights are not read")
    assert "\n" not in message and not marker.exists()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool])
def test_integer_weights_of_a_dense_or_masked_model_are_one_line_naming_the_tensor(tmp_path, masked, dtype):
    """A quantized model's int8 weights (or integers written by mistake) are not floats to copy in: converted, the
    model would answer at random. A packed directory refuses them; so do dense and masked ones."""
    from safetensors.torch import load_file, save_file

    model = tiny()
    if masked:
        masks.apply_masks_(model, "sigmoid_threshold", (32, 32))
    directory = save_model(model, None, tmp_path / "model")
    weights = directory / "model.safetensors"
    state = load_file(str(weights))
    name = "bert.encoder.layer.1.output.dense.weight"
    state[name] = (state[name] * 100).round().clamp(-1, 1).to(dtype)
    save_file(state, str(weights), metadata={"format": "pt"})
    for qa_head in (False, True):
        with pytest.raises(CheckpointError) as caught:
            load_model(directory, qa_head=qa_head)
        message = str(caught.value)
        assert message.startswith(f"{weights}: tensor {name!r} has dtype {str(dtype).removeprefix('torch.')}")
        assert "float32" in message and "\n" not in message


def test_an_int8_model_is_refused_by_the_commands_not_answered_from(tmp_path, tiny_bert_config, tokenizer, capsys):
    from safetensors.torch import load_file, save_file

    from workflows import cli

    torch.manual_seed(0)
    directory = save_model(BertForQuestionAnswering(tiny_bert_config).eval(), tokenizer, tmp_path / "int8")
    weights = directory / "model.safetensors"
    state = {name: (tensor * 100).round().clamp(-128, 127).to(torch.int8) if ".encoder." in name and
             name.endswith("dense.weight") else tensor for name, tensor in load_file(str(weights)).items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    assert cli.main(["ask", str(directory), "--question", "Who wrote it?", "--context", "Ann wrote it."]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"error: {weights}: tensor " in captured.err and "int8" in captured.err


LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 8120016\n")


@pytest.mark.parametrize("kind", ["dense", "masked", "packed", "shard"])
def test_a_git_lfs_pointer_in_place_of_the_weights_is_said_to_be_one(tmp_path, kind):
    """A model repository cloned without git-lfs holds small text pointers where its weights should be: the line
    says so and how to fetch them, rather than calling the file corrupted."""
    from pruning.packing import pack, save_packed

    model = tiny()
    if kind == "masked":
        masks.apply_masks_(model, "sigmoid_threshold", (32, 32))
    directory = (save_packed(pack(model), None, tmp_path / "model") if kind == "packed"
                 else save_model(model, None, tmp_path / "model"))
    weights = _shard(model, directory)[1] if kind == "shard" else directory / "model.safetensors"
    weights.write_text(LFS_POINTER)
    with pytest.raises(ValueError) as caught:
        load_model(directory)
    assert str(caught.value) == f"{weights}: a Git LFS pointer, not the weights (fetch them with `git lfs pull` in " \
                                "the repository the directory was cloned from)"
