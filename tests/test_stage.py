"""`stages.Stage`: the skip bookkeeping every pipeline stage shares (the crash tests cover the stages themselves)."""

from domainlm.stages import Stage


def test_stage_is_done_only_with_its_output_the_same_inputs_and_intact_outputs(tmp_path):
    out = tmp_path / "out.json"
    calls = []

    def work():
        calls.append(1)
        out.write_text("x")
        return "ran"

    def stage(inputs, intact=None):
        return Stage(tmp_path, "demo", out, inputs, intact)

    assert stage(({"a": 1},)).run(work, lambda: "loaded") == ("ran", True)
    assert stage(({"a": 1},)).run(work, lambda: "loaded") == ("loaded", False)  # a rerun is a no-op
    assert (tmp_path / ".stages" / "demo.json").exists()
    assert not stage(({"a": 2},)).done()  # other inputs
    assert not stage(({"a": 1},), intact=lambda: False).done()  # an output found torn
    out.unlink()
    assert not stage(({"a": 1},)).done()  # the completion mark is gone
    s = stage(({"a": 1},))
    s.start()  # redoing: the marker goes first, so a kill before finish() leaves the stage not done
    out.write_text("x")
    assert not s.done()
    s.finish()
    assert s.done() and len(calls) == 1
