"""Data safety: no user file is deleted or written outside the output folder, whatever the inputs or signals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
from PIL import Image

from trl_rejection.data import MixConfig, MixDataError, build_mix
from trl_rejection.errors import UserError
from trl_rejection.io import check_image, clean_stale, replace_dir, safe_name, staging_dir

ROOT = Path(__file__).resolve().parents[1]


def _record(rid: str, image: str | None) -> dict:
    rec = {"id": rid, "conversations": [{"from": "human", "value": f"What is {rid}?" + ("\n<image>" if image else "")},
                                        {"from": "gpt", "value": f"It is {rid}."}]}
    if image:
        rec["image"] = image
    return rec


def _sources(folder: Path, n: int = 12, ids: list[str] | None = None) -> tuple[Path, Path]:
    """med.json and gen.json with one 8x8 PNG per record under folder/img."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.new("RGB", (8, 8), (k, 2 * k, 3)).save(folder / "img" / f"{k}.png")
    med_ids = ids or [f"m{k}" for k in range(n)]
    med = folder / "med.json"
    med.write_text(json.dumps([_record(rid, f"img/{k % n}.png") for k, rid in enumerate(med_ids)]))
    gen = folder / "gen.json"
    gen.write_text(json.dumps([_record(f"g{k}", f"img/{k}.png" if k % 3 else None) for k in range(n)]))
    return med, gen


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (symlinks not followed) with a hash of its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def _cfg(med: Path, gen: Path, **kw) -> MixConfig:
    return MixConfig(str(med), str(gen), **{"n_refusal": 4, "n_normal": 6, **kw})


@pytest.fixture
def src(tmp_path: Path) -> tuple[Path, Path]:
    return _sources(tmp_path / "src")


# --- --overwrite only ever replaces an earlier mix ------------------------------------------------------------------

def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trl_rejection.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("where", [".", "sources", "parent"])
def test_overwrite_onto_a_folder_holding_inputs_or_the_cwd_is_refused_and_touches_nothing(where, tmp_path):
    med, gen = _sources(tmp_path / "proj" / "src")
    cwd = {"." : med.parent, "sources": tmp_path / "proj", "parent": med.parent}[where]
    out = {".": ".", "sources": "src", "parent": ".."}[where]
    before = _snapshot(tmp_path)
    proc = _cli(["mix", "--refusal_source", str(med), "--normal_source", str(gen), "--n_refusal", "4",
                 "--n_normal", "6", "--output_dir", out, "--overwrite"], cwd)
    line = _one_error_line(proc)
    assert "Fix:" in line
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in (tmp_path / "proj").iterdir()) == ["src"]


def test_overwrite_of_a_folder_that_is_not_a_mix_is_refused(src, tmp_path):
    user = tmp_path / "results"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a mix this tool wrote.*no mix_config.json"):
        build_mix(_cfg(*src), user, overwrite=True)
    assert (user / "notes.txt").read_text() == "mine" and len(list(user.iterdir())) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_home_and_root_are_refused(src, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for target in (home, Path("/")):
        with pytest.raises(UserError, match="home folder|root folder"):
            build_mix(_cfg(*src), target, overwrite=True)
    assert list(home.iterdir()) == []


def test_symlinked_output_dir_is_not_replaced(src, tmp_path):
    first = tmp_path / "mix_a"
    build_mix(_cfg(*src), first)
    link = tmp_path / "link"
    link.symlink_to(first)
    with pytest.raises(UserError, match="is a symlink"):
        build_mix(_cfg(*src, seed=1), link, overwrite=True)
    assert link.is_symlink() and (first / "mix_config.json").exists()


def test_overwrite_replaces_an_earlier_mix_and_leaves_no_temp(src, tmp_path):
    out = tmp_path / "out"
    build_mix(_cfg(*src, seed=0), out)
    old_ids = datasets.load_from_disk(str(out))["id"]
    ds = build_mix(_cfg(*src, seed=3), out, overwrite=True)
    assert ds["id"] != old_ids and datasets.load_from_disk(str(out))["id"] == ds["id"]
    assert json.loads((out / "mix_config.json").read_text())["seed"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_mix_cannot_overwrite_itself_when_it_is_the_source(src, tmp_path):
    out = tmp_path / "mix"
    build_mix(_cfg(*src), out)
    with pytest.raises(UserError, match="holds the input"):
        build_mix(MixConfig(str(out), str(src[1]), n_refusal=2, n_normal=3), out, overwrite=True)
    assert len(datasets.load_from_disk(str(out))) == 10


# --- nothing is written outside output_dir ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad_id", ["../../escaped", "/tmp/abs_escape_trl_rejection", "..", "a/../../b", ".hidden",
                                    "x" * 300, "é/ü\\c:d"])
def test_exported_image_names_never_leave_the_output_folder(bad_id, tmp_path):
    work = tmp_path / "w"
    med, gen = _sources(work / "src", ids=[bad_id] + [f"m{k}" for k in range(1, 12)])
    before = _snapshot(tmp_path)
    out = work / "deep" / "out"
    build_mix(_cfg(med, gen, n_refusal=12, n_normal=2), out, embed_images=True, export_llava=True)
    after = _snapshot(tmp_path)
    new = {p for p in after if p not in before}
    assert new and all(p.startswith("w/deep/out/") for p in new), sorted(new)
    assert not Path("/tmp/abs_escape_trl_rejection").exists() and not Path("/tmp/abs_escape_trl_rejection_0.png").exists()
    exported = json.loads((out / "llava.json").read_text())
    row = next(r for r in exported if r["id"] == bad_id)
    assert (out / row["image"]).is_file() and (out / row["image"]).resolve().parent == (out / "images").resolve()


def test_safe_names_are_distinct_for_distinct_ids():
    ids = ["a/b", "a_b", "a\\b", "../a_b", "a b"]
    names = [safe_name(i) for i in ids]
    assert len(set(names)) == len(ids) and all("/" not in n and "\\" not in n and not n.startswith(".")
                                               for n in names)


def test_symlink_out_of_the_image_root_is_refused(tmp_path):
    med, gen = _sources(tmp_path / "src")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    (med.parent / "img" / "0.png").unlink()
    (med.parent / "img" / "0.png").symlink_to(secret)
    with pytest.raises(MixDataError, match="symlink.*outside the image root.*follow_symlinks"):
        build_mix(_cfg(med, gen, n_refusal=12, n_normal=0), tmp_path / "out", embed_images=True)
    assert not (tmp_path / "out").exists()
    # following links on purpose still never embeds bytes that are not an image
    with pytest.raises(MixDataError, match="not an image"):
        build_mix(_cfg(med, gen, n_refusal=12, n_normal=0, follow_symlinks=True), tmp_path / "out2",
                  embed_images=True)


def test_symlink_to_an_image_elsewhere_is_accepted_when_asked(tmp_path):
    med, gen = _sources(tmp_path / "src")
    elsewhere = tmp_path / "datasets" / "coco"
    elsewhere.mkdir(parents=True)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(elsewhere / "0.png")
    (med.parent / "img" / "0.png").unlink()
    (med.parent / "img" / "0.png").symlink_to(elsewhere / "0.png")
    ds = build_mix(_cfg(med, gen, n_refusal=12, n_normal=0, follow_symlinks=True), tmp_path / "out")
    assert len(ds) == 12


# --- images that do not decode are refused at build time ------------------------------------------------------------

@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated_png", "truncated_jpeg"])
def test_corrupt_images_of_drawn_rows_are_refused_naming_the_record(damage, tmp_path):
    med, gen = _sources(tmp_path / "src")
    img = med.parent / "img" / "5.png"
    if damage == "empty":
        img.write_bytes(b"")
    elif damage == "garbage":
        img.write_bytes(os.urandom(500))
    elif damage == "truncated_png":
        Image.effect_noise((256, 256), 50).convert("RGB").save(img)
        img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    else:
        Image.effect_noise((256, 256), 50).convert("RGB").save(img, format="JPEG")
        img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    assert check_image(str(img)) is not None
    with pytest.raises(MixDataError) as e:
        build_mix(_cfg(med, gen, n_refusal=12, n_normal=0), tmp_path / "out")
    assert "record 'm5'" in str(e.value) and "5.png" in str(e.value) and "Fix:" in str(e.value)
    assert not (tmp_path / "out").exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_image_check_levels(tmp_path):
    med, gen = _sources(tmp_path / "src")
    img = med.parent / "img" / "5.png"
    Image.effect_noise((128, 128), 50).convert("RGB").save(img)
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])  # truncated: the header still reads
    cfg = _cfg(med, gen, n_refusal=12, n_normal=0)
    assert len(build_mix(MixConfig(**{**vars(cfg), "image_check": "open"}), tmp_path / "open")) == 12
    with pytest.raises(MixDataError, match="does not decode"):
        build_mix(cfg, tmp_path / "decode")
    img.write_bytes(b"")
    with pytest.raises(MixDataError, match="empty"):
        build_mix(MixConfig(**{**vars(cfg), "image_check": "open"}), tmp_path / "open2")
    assert len(build_mix(MixConfig(**{**vars(cfg), "image_check": "off"}), tmp_path / "off")) == 12


def test_validate_all_checks_images_of_rows_not_drawn(tmp_path):
    med, gen = _sources(tmp_path / "src")
    (med.parent / "img" / "11.png").write_bytes(b"")  # only g11 and m11 use it
    cfg = MixConfig(str(med), str(gen), n_refusal=1, n_normal=1, seed=0)
    build_mix(cfg, tmp_path / "drawn")  # the drawn rows are fine...
    ds = datasets.load_from_disk(str(tmp_path / "drawn"))
    assert "m11" not in ds["id"] and "g11" not in ds["id"]
    with pytest.raises(MixDataError, match="record '(m|g)11'.*empty"):  # ...but 'all' looks at every record
        build_mix(MixConfig(**{**vars(cfg), "validate": "all"}), tmp_path / "all")


# --- the swap: at every instant the old or the new mix is complete ---------------------------------------------------

def _mix_dir(folder: Path, tag: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "mix_config.json").write_text(tag)
    (folder / "data.arrow").write_text(tag * 100)
    return folder


def test_swap_cut_between_its_renames_is_undone_on_the_next_run(tmp_path, monkeypatch):
    target = _mix_dir(tmp_path / "mix", "old")
    import trl_rejection.io as io_mod

    monkeypatch.setattr(io_mod, "_exchange", lambda a, b: False)  # the fallback path: rename aside, move in
    real_replace = os.replace
    calls = []

    def cut(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real_replace(a, b)

    monkeypatch.setattr(io_mod.os, "replace", cut)
    with pytest.raises(KeyboardInterrupt):
        with staging_dir(target) as work:
            replace_dir(_mix_dir(work / "data", "new"), target)
    monkeypatch.setattr(io_mod.os, "replace", real_replace)
    assert not target.exists()  # the instant the issue describes ...
    # ... which the next run repairs: the aside folder is ours, its process is gone (pretend: another pid)
    aside = next(tmp_path.glob(".mix.trl-rejection-previous-*"))
    owner = json.loads((aside / ".trl_rejection_tmp.json").read_text())
    (aside / ".trl_rejection_tmp.json").write_text(json.dumps({**owner, "pid": 2 ** 22 + 7}))
    clean_stale(target)
    assert (target / "mix_config.json").read_text() == "old" and not (target / ".trl_rejection_tmp.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["mix"]


def test_stale_temp_folders_are_removed_only_when_provably_ours(tmp_path):
    target = tmp_path / "mix"
    ours_dead = tmp_path / ".mix.trl-rejection-abc"
    ours_dead.mkdir()
    (ours_dead / ".trl_rejection_tmp.json").write_text(json.dumps(
        {"tool": "trl-rejection", "target": str(target.resolve()), "role": "staging", "pid": 2 ** 22 + 7,
         "host": os.uname().nodename}))
    ours_alive = tmp_path / ".mix.trl-rejection-live"
    ours_alive.mkdir()
    (ours_alive / ".trl_rejection_tmp.json").write_text(json.dumps(
        {"tool": "trl-rejection", "target": str(target.resolve()), "role": "staging", "pid": os.getpid(),
         "host": os.uname().nodename}))
    lookalike = tmp_path / ".mix.trl-rejection-user"  # same name pattern, no owner file: the user's
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("x")
    other_target = tmp_path / ".mix.trl-rejection-other"
    other_target.mkdir()
    (other_target / ".trl_rejection_tmp.json").write_text(json.dumps(
        {"tool": "trl-rejection", "target": str(tmp_path / "elsewhere"), "pid": 2 ** 22 + 7,
         "host": os.uname().nodename}))
    assert clean_stale(target) == [ours_dead.resolve()]
    assert ours_alive.exists() and (lookalike / "keep.txt").exists() and other_target.exists()


def test_a_staging_folder_killed_before_its_owner_file_is_removed_only_if_empty_and_dead(tmp_path):
    """A SIGKILL between creating the staging folder and writing its owner file (seen in CI): the folder's name says
    which process of which host made it; it goes once that process is gone and nothing but a partial owner file is
    inside. A live process's folder, another host's, a non-empty one and a look-alike name stay."""
    from trl_rejection.io import _staging_prefix

    target = (tmp_path / "mix").resolve()
    dead = 2 ** 22 + 7
    empty_dead = tmp_path / (_staging_prefix(target, dead) + "a1")
    partial_dead = tmp_path / (_staging_prefix(target, dead) + "b2")
    empty_alive = tmp_path / (_staging_prefix(target, os.getpid()) + "c3")
    full_dead = tmp_path / (_staging_prefix(target, dead) + "d4")
    other_host = tmp_path / f".mix.trl-rejection-{dead}-00000000-e5"
    lookalike = tmp_path / f".mix.trl-rejection-{dead}-user"
    for folder in (empty_dead, partial_dead, empty_alive, full_dead, other_host, lookalike):
        folder.mkdir()
    (partial_dead / ".trl_rejection_tmp.json").write_text('{"tool": "trl-rej')
    (full_dead / "data.arrow").write_text("x")
    assert sorted(clean_stale(target)) == sorted([empty_dead.resolve(), partial_dead.resolve()])
    assert all(f.exists() for f in (empty_alive, full_dead, other_host, lookalike))
    assert not empty_dead.exists() and not partial_dead.exists()


# --- kills at several points of a large build and of an overwrite ---------------------------------------------------

_BUILD = """
import sys
from trl_rejection.cli import main
main(sys.argv[1:])
"""


def _large_sources(folder: Path) -> tuple[Path, Path]:
    subprocess.run([sys.executable, str(ROOT / "bench" / "synthetic_llava.py"), "--records", "40000", "--out",
                    str(folder / "gen.json"), "--image_root", str(folder / "images"), "--images", "60"], check=True,
                   capture_output=True, timeout=300)
    subprocess.run([sys.executable, str(ROOT / "bench" / "synthetic_llava.py"), "--records", "2000", "--out",
                    str(folder / "med.json"), "--image_root", str(folder / "images"), "--images", "60",
                    "--id_prefix", "med-", "--seed", "1"], check=True, capture_output=True, timeout=300)
    return folder / "med.json", folder / "gen.json"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_kill_during_build_and_overwrite_never_leaves_a_broken_mix(sig, tmp_path):
    med, gen = _large_sources(tmp_path / "src")
    out = tmp_path / "out"
    before = _snapshot(tmp_path / "src")
    args = ["mix", "--refusal_source", str(med), "--normal_source", str(gen), "--refusal_image_root",
            str(tmp_path / "src" / "images"), "--normal_image_root", str(tmp_path / "src" / "images"),
            "--n_refusal", "2000", "--n_normal", "30000", "--output_dir", str(out), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    finished = []
    for k, delay in enumerate([0.0, 0.15, 0.4, 0.8, 1.5, None]):  # seconds after the build's temp folder appears
        seed = ["--seed", str(k)]
        proc = subprocess.Popen([sys.executable, "-c", _BUILD, *args, *seed], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if delay is None:
            proc.communicate(timeout=600)
            assert proc.returncode == 0
        else:
            deadline = time.monotonic() + 120
            while proc.poll() is None and not any(p.name.startswith(".out.") for p in tmp_path.iterdir()) \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(delay)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=120)
            if sig == signal.SIGTERM and proc.returncode != 0:
                assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err, err
        finished.append(proc.returncode == 0)
        if sig == signal.SIGTERM:  # handled: the run cleans up after itself
            assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
        if out.exists():  # whatever the instant of the kill: a complete mix, the old one or the new one
            ds = datasets.load_from_disk(str(out))
            config = json.loads((out / "mix_config.json").read_text())
            assert len(ds) == 32000 and config["seed"] in range(k + 1)
            if proc.returncode == 0:
                assert config["seed"] == k
        else:
            assert not any(finished)
    assert finished[-1] and not all(finished[:-1])  # some kills landed before the build had finished
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the last, complete run removed what killed runs had left
    assert _snapshot(tmp_path / "src") == before


def test_sample_data_is_written_only_into_a_new_or_empty_folder(tmp_path, monkeypatch, capsys):
    from trl_rejection.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "sample_med.json").write_text("my own file")
    monkeypatch.chdir(tmp_path)
    for target, match in ((mine, "not an empty folder"), (tmp_path, "current folder")):
        with pytest.raises(SystemExit) as e:
            main(["sample-data", str(target)])
        assert e.value.code == 2 and match in capsys.readouterr().err
    assert (mine / "sample_med.json").read_text() == "my own file" and len(list(mine.iterdir())) == 1
    (tmp_path / "empty").mkdir()
    main(["sample-data", "empty"])
    main(["sample-data", "new/deeper"])
    for folder in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        assert json.loads((folder / "sample_med.json").read_text())[0]["image"].startswith("med/")
        assert (folder / "med").is_dir() and not list(folder.glob(".*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine", "new"]
