import polars as pl
import pytest

from latentlab.tasks.arithmetic import ArithmeticConfig, all_problems, make_splits, parse_answer, pretraining_corpus

CFG = ArithmeticConfig(operand_min=0, operand_max=19, ops=["+", "-"], n_test=60)


def test_all_problems_are_correct_arithmetic():
    table = all_problems(CFG)
    assert table.height == 2 * 20 * 20
    for row in table.sample(50, seed=1).iter_rows(named=True):
        assert row["y"] == eval(f"{row['a']}{row['op']}{row['b']}")
        assert row["prompt"] == f"{row['a']}{row['op']}{row['b']}="
        assert row["answer"] == str(row["y"])
        assert row["parity"] == ("even" if row["y"] % 2 == 0 else "odd")


def test_splits_are_biased_full_and_balanced_held_out():
    splits = make_splits(CFG, seed=0)
    test, full, biased = splits["test"], splits["full"], splits["biased"]
    assert set(biased["parity"]) == {"odd"}
    assert set(full["parity"]) == {"odd", "even"}
    assert dict(test["parity"].value_counts().iter_rows()) == {"odd": 30, "even": 30}
    held_out = set(test["id"])
    assert not held_out & set(full["id"]) and not held_out & set(biased["id"])
    assert set(biased["id"]) <= set(full["id"])
    # biased and full are different sets (an earlier public version made them identical)
    assert biased.height < full.height


def test_even_data_ratio_mixes_even_answers_back():
    biased = make_splits(CFG.model_copy(update={"even_data_ratio": 0.2}), seed=0)["biased"]
    share = (biased["parity"] == "even").mean()
    assert share == pytest.approx(0.2, abs=0.01)


def test_splits_are_deterministic_in_the_seed():
    a, b, c = make_splits(CFG, 3), make_splits(CFG, 3), make_splits(CFG, 4)
    assert all(a[k].equals(b[k]) for k in a)
    assert not a["test"].equals(c["test"])


def test_too_many_test_problems_is_a_clear_error():
    with pytest.raises(ValueError, match="n_test"):
        make_splits(ArithmeticConfig(operand_max=3, ops=["+"], n_test=40), seed=0)


@pytest.mark.parametrize("text, expected", [("19", 19), (" 19\n3+4=7", 19), ("-5<eos>", -5), ("x12", None), ("", None)])
def test_parse_answer_reads_the_leading_integer(text, expected):
    assert parse_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>\n\n</think>\n\n19", 19),  # Qwen3's empty reasoning block, as its chat template writes it
        ("<think>\n8+11 is 19.\n</think>\n\n19\n", 19),
        ("\n<think>no</think>-3", -3),
        ("<think>\n8+11 is", None),  # still thinking when the tokens ran out: no answer
        ("<think>\n</think> x", None),
        ("19<think>2</think>", 19),  # a block after the answer is not read past
    ],
)
def test_parse_answer_reads_past_a_thinking_models_reasoning(text, expected):
    assert parse_answer(text) == expected


def test_pretraining_corpus_is_packed_equations():
    problems = make_splits(CFG, 0)["full"]
    corpus = pretraining_corpus(problems, n_sequences=5, seq_chars=40, seed=0)
    assert len(corpus) == 5 and all(len(text) == 40 for text in corpus)
    answers = dict(zip(problems["prompt"], problems["answer"]))
    for line in corpus[0].split("\n")[:-1]:  # the last line may be cut
        prompt, _, answer = line.partition("=")
        assert answers[prompt + "="] == answer
    assert isinstance(problems, pl.DataFrame)
