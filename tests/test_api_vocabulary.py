def test_the_demo_table_comes_with_a_legend_of_its_columns():
    from dreampool_gpu.demo import LEGEND, table

    header = table([])[0]
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert len(cells) == 15
    legend = " ".join(LEGEND)
    for phrase in (
        "reached",
        "steps to",
        "seconds to",
        "final accuracy",
        "helpful rate",
        "clean replay",
        "unique / 100 steps",
        "util_mean right / wrong label",
        "train s",
        "pool s",
        "fit s",
        "utility s",
        "pool, utility / train",
        "wall / step vs none",
        "vs random",
    ):
        assert phrase in legend, phrase
        assert any(phrase in c for c in cells), phrase  # and it is a column of the table
