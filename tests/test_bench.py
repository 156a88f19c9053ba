"""bench.py's generate and encode sections on tiny settings, their measurements run in this process. The
README test runs bench.py itself as a user does (its decode part, each part in a fresh process)."""
import bench
import settings


def test_generate_and_encode_sections_report_their_measurements():
    c = settings.parse_settings(vars(bench), [
        "--decode_steps=20", "--rounds=1", "--encode_clips=1", "--encode_seconds=2", "--compress_clips=2", "--device=cpu"])
    calls = []

    def sub(args, limit=None):          # what bench.py runs in a fresh process, here in this one
        calls.append(args["part"])
        return bench.PARTS[args["part"]](c, "cpu")
    text = "\n".join(bench.generate_section(c, sub, 1e11) + bench.encode_section(c, sub, 1e11))
    assert calls == ["generate", "encode"]
    assert "### generate.py's path end to end: 0.133333 s per prompt" in text
    rows = [line for line in text.splitlines() if line.startswith("| eager (auto) |")]   # auto: eager for 20 steps
    assert [row.split(" | ")[1] for row in rows] == ["1", "4"]                            # 1 prompt, then 4 together
    assert "### Encodec 48 kHz (1 clips × 2 s" in text and "compress.py end to end, 2 synthetic clips of 5 s" in text
    assert "audio-s/s" in text and "nan" not in text


def test_a_bench_run_rewrites_only_its_own_block_of_the_current_figures(tmp_path):
    current = tmp_path / "BENCHMARKS.md"
    current.write_text("# now\n<!-- bench.py: decode on cpu -->\nold table\n<!-- end -->\nkept\n<!-- bench.py: decode on gpu -->\n"
                       "gpu table\n<!-- end -->\n")
    assert bench.update_current(str(current), "decode on cpu", ["### A heading", "| new | table |", "Measured today."])
    assert current.read_text() == ("# now\n<!-- bench.py: decode on cpu -->\n| new | table |\nMeasured today.\n<!-- end -->\nkept\n"
                                   "<!-- bench.py: decode on gpu -->\ngpu table\n<!-- end -->\n")
    assert not bench.update_current(str(current), "train on cpu", ["x"])
