"""progress_bar: tqdm on a terminal, short plain lines elsewhere (no carriage-return floods in logs)."""

import io

from vitkit.progress import progress_bar


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_non_terminal_gets_plain_lines_without_carriage_returns():
    out = io.StringIO()
    bar = progress_bar(total=1000, desc="epoch 1/1", file=out, every=0.0, unit="batch")
    for _ in range(1000):
        bar.update(1)
        bar.set_postfix({"loss": "0.1"})
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    assert text.splitlines()[-1].startswith("epoch 1/1: 1000/1000 batch")
    assert "loss=0.1" in text


def test_non_terminal_rate_limited():
    out = io.StringIO()
    bar = progress_bar(range(500), desc="eval", file=out, every=3600.0)
    assert sum(1 for _ in bar) == 500
    assert len(out.getvalue().splitlines()) == 1  # only the closing line


def test_terminal_gets_tqdm():
    out = _Tty()
    bar = progress_bar(total=3, desc="x", file=out)
    bar.update(3)
    bar.close()
    assert "\r" in out.getvalue()


def test_disabled_prints_nothing():
    out = io.StringIO()
    bar = progress_bar(total=3, file=out, disable=True)
    bar.update(3)
    bar.close()
    assert out.getvalue() == ""
