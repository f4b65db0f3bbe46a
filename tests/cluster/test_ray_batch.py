"""``glyphserve batch --ray`` on a local Ray instance (one per module: it takes long to start on two cores)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from glyphserve.batch import BatchOptions, BatchRunner, ResultLog, collect_documents, read_results
from glyphserve.cli import main

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.timeout(420)

QUESTIONS = ["What is this document about?", "Who is mentioned?"]
MAX_NEW_TOKENS = 8
PARAGRAPH = ("The river port of Alderney handled {n} barges in the spring of the year, most of them carrying grain "
             "and timber downstream to the estuary. Harbour master Ines Calloway kept the ledgers herself.")
# What a local and a Ray run must agree on (timings differ).
SAME = ("answer", "thinking", "pages", "pages_used", "vision_tokens", "text_tokens", "prompt_tokens", "new_tokens",
        "finish_reason", "kind", "error")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=3, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ray-batch")
    folder = root / "docs"
    folder.mkdir()
    for i in range(6):
        text = "\n\n".join(PARAGRAPH.format(n=i * 10 + k) for k in range(2 + i % 3))
        (folder / f"report{i}.txt").write_text(text, encoding="utf-8")
    (folder / "corrupt.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage without xref\n")
    questions = root / "questions.txt"
    questions.write_text("\n".join(QUESTIONS) + "\n", encoding="utf-8")
    return folder, questions


@pytest.fixture(scope="module")
def local_results(inputs, tiny_model_dir, tmp_path_factory) -> dict[tuple[str, str], dict]:
    """The local batch's results on the same inputs (in this process)."""
    from glyphserve.engine import Engine, EngineConfig

    folder, _ = inputs
    engine = Engine.load(EngineConfig(model=str(tiny_model_dir), device="cpu", max_num_seqs=4))
    path = tmp_path_factory.mktemp("local") / "results.jsonl"
    with ResultLog(path) as log:
        BatchRunner(lambda: engine, log, BatchOptions(batch_size=4, max_new_tokens=MAX_NEW_TOKENS, workers=0)).run(
            collect_documents(str(folder), QUESTIONS))
    return _by_key(path)


def _by_key(path: Path) -> dict[tuple[str, str], dict]:
    records = read_results(path)
    keys = [(r["id"], r["question"]) for r in records]
    assert len(keys) == len(set(keys)), "an item was written twice"
    return {key: record for key, record in zip(keys, records)}


def _batch(inputs, tiny_model_dir, output: Path, *extra: str) -> int:
    folder, questions = inputs
    return main(["batch", str(folder), "--questions", str(questions), "-o", str(output), "--model",
                 str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", str(MAX_NEW_TOKENS), "--ray", *extra])


def test_ray_batch_equals_the_local_batch_result_for_result(local_ray, inputs, tiny_model_dir, local_results,
                                                           tmp_path, capsys):
    import pyarrow.parquet as pq

    output = tmp_path / "ray.jsonl"
    assert _batch(inputs, tiny_model_dir, output, "--batch-size", "4", "--parquet", str(tmp_path / "r.parquet")) == 0
    results = _by_key(output)
    assert set(results) == set(local_results) and len(results) == 7 * len(QUESTIONS)
    for key, record in results.items():
        assert {f: record[f] for f in SAME} == {f: local_results[key][f] for f in SAME}, key
    assert all(results[("corrupt.pdf", q)]["error"]["code"] == "corrupt_file" for q in QUESTIONS)
    # (decode may round to 0.0 s: an answer that ends at its first token decodes for microseconds)
    untimed = [(key, r["timings"]) for key, r in results.items() if not r["error"] and not (
        r["timings"]["render"] > 0 and r["timings"]["total"] > 0 and r["timings"]["decode"] >= 0)]
    assert not untimed, untimed
    table = pq.read_table(tmp_path / "r.parquet")
    assert table.num_rows == len(results) and sorted(table.column("answer").to_pylist(), key=str) == sorted(
        (r["answer"] for r in results.values()), key=str)
    assert "12 answered, 2 failed, 0 skipped" in capsys.readouterr().out

    # A rerun skips what is done; --retry-failed runs the failed items again (they fail again, once each).
    assert _batch(inputs, tiny_model_dir, output, "--retry-failed") == 0
    assert "0 answered, 2 failed, 12 skipped" in capsys.readouterr().out
    assert _by_key(output).keys() == results.keys()


def test_killing_the_engine_actor_mid_run_loses_nothing(local_ray, inputs, tiny_model_dir, local_results, tmp_path):
    from ray._private.state import actors  # the GCS's actor table (the state API needs the dashboard)

    output = tmp_path / "ray.jsonl"
    outcome: list[int] = []
    # One engine, one document per task: the kill lands between tasks, with most of the run still to do.
    run = threading.Thread(target=lambda: outcome.append(_batch(inputs, tiny_model_dir, output, "--batch-size", "1",
                                                                "--engines", "1")))
    run.start()
    deadline = time.monotonic() + 240
    while not (output.exists() and len(read_results(output)) >= 2):
        assert run.is_alive() and time.monotonic() < deadline, "the run wrote nothing"
        time.sleep(0.05)
    engines = [a for a in actors(actor_state_name="ALIVE").values() if "BatchEngine" in a["ActorClassName"]]
    assert len(engines) == 1, engines
    os.kill(engines[0]["Pid"], signal.SIGKILL)
    written_at_kill = len(read_results(output))
    run.join(timeout=300)
    assert not run.is_alive() and outcome == [0]
    assert written_at_kill < len(local_results), "the run ended before the kill"
    results = _by_key(output)  # every item exactly once
    assert set(results) == set(local_results)
    assert {k: r["answer"] for k, r in results.items()} == {k: r["answer"] for k, r in local_results.items()}
    assert actors(engines[0]["ActorID"])["NumRestarts"] >= 1  # Ray started the engine again
