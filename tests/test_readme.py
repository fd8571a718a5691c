"""The README's "minildm in an assignment" examples run as written (with fewer training steps)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def assignment_example(index: int = 0) -> str:
    section = README.read_text().split("## minildm in an assignment", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)[index]


def test_the_assignment_example_trains_samples_and_scores(tmp_path, monkeypatch, capsys):
    code = assignment_example()
    assert "dataset=images" in code and "metrics.evaluate_shapes" in code
    monkeypatch.chdir(tmp_path)
    # Same code, 20 steps instead of 2000 and 10 sampling steps instead of 50: this checks that it runs.
    fast = code.replace("config.train.max_steps = 2000", "config.train.max_steps = 20").replace("steps=50", "steps=10")
    assert fast != code
    exec(compile(fast, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "assignment" / "samples.png").is_file()
    confident, distance, precision, recall = (float(v) for v in capsys.readouterr().out.split()[-4:])
    assert 0 <= confident <= 1 and distance > 0 and 0 <= precision <= 1 and 0 <= recall <= 1


def test_the_latent_diffusion_example_trains_and_samples(tmp_path, monkeypatch):
    code = assignment_example(1)
    assert "latent.training_data" in code and "latent.sample" in code
    monkeypatch.chdir(tmp_path)
    fast = code.replace("config.train.max_steps = 2000", "config.train.max_steps = 5").replace(
        "ShapesDataset(2_000", "ShapesDataset(200")
    assert fast.count("max_steps = 5") == 1 and "ShapesDataset(200," in fast
    exec(compile(fast, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "assignment-ldm" / "samples.png").is_file()
