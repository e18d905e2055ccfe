import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from corpora import emoji
from tests.helpers import folder_digest

FIXTURES = Path(__file__).parent / "fixtures" / "emoji"
COLUMNS = {"file_name", "text", "style", "concept", "category", "subcategory", "skin_tone"}
NAMES = {
    "1f34e": "red apple",
    "1f44b": "waving hand",
    "1f44b-1f3fd": "waving hand: medium skin tone",
    "1f1ef-1f1f5": "flag: Japan",
}


def _rows(folder):
    return {
        split: [json.loads(line) for line in (folder / split / "metadata.jsonl").read_text().splitlines()]
        for split in ("train", "validation")
    }


def _build(out, **kwargs):
    kwargs = {"cache_dir": FIXTURES, "resolution": 24, "progress": False, "workers": 1} | kwargs
    return emoji.build(out, **kwargs)


def test_captions_are_cldr_short_names():
    cases = {
        "🍎": "red apple",
        "⏰": "alarm clock",
        "🏄🏽": "person surfing: medium skin tone",
        "🇯🇵": "flag: Japan",
        "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f": "flag: Scotland",
        "#\ufe0f\u20e3": "keycap: #",
        "\U0001f468\u200d\U0001f469\u200d\U0001f466": "family: man, woman, boy",
        "\U0001f469\u200d\u2764\ufe0f\u200d\U0001f468": "couple with heart: woman, man",
        "\U0001f468\U0001f3fd\u200d\U0001f9b0": "man: medium skin tone, red hair",
        "\U0001f471\u200d\u2640\ufe0f": "woman: blond hair",
        "\U0001faf1\U0001f3fb\u200d\U0001faf2\U0001f3ff": "handshake: light skin tone, dark skin tone",
        "\U0001f9d1\U0001f3fb\u200d\u2764\ufe0f\u200d\U0001f48b\u200d\U0001f9d1\U0001f3fc": (
            "kiss: person, person, light skin tone, medium-light skin tone"
        ),
    }
    for text, name in cases.items():
        assert emoji.short_name(text) == name
        assert emoji.concepts()[emoji.concept_key(text)].name == name


def test_concepts_are_keyed_without_fe0f_and_know_their_base():
    assert emoji.concept_key("❤️") == "2764"
    assert emoji.concept_key("#\ufe0f\u20e3") == "0023-20e3"
    table = emoji.concepts()
    assert table["1f3c4-1f3fd"].base == "1f3c4" and table["1f3c4-1f3fd"].skin_tone
    assert table["1f34e"].base == "1f34e" and not table["1f34e"].skin_tone
    assert table["1faf1-1f3fb-200d-1faf2-1f3ff"].base == "1f91d"  # two-tone handshake follows 🤝
    assert all(c.base in table and not table[c.base].skin_tone for c in table.values())
    assert all(c.skin_tone == ("-1f3f" in c.key) for c in table.values())


def test_split_holds_out_about_the_fraction_of_bases_with_their_skin_tones():
    table = emoji.concepts()
    bases = [c for c in table.values() if not c.skin_tone]
    splits = {}
    for seed in (0, 1):
        splits[seed] = {key: emoji.split_of(c, seed, 0.1) for key, c in table.items()}
        assert all(splits[seed][c.key] == splits[seed][c.base] for c in table.values())
        held = sum(splits[seed][c.key] == "validation" for c in bases) / len(bases)
        assert 0.07 < held < 0.13
    assert splits[0] != splits[1]


def test_build_writes_every_style_from_cached_assets(tmp_path):
    counts = _build(tmp_path, heldout_fraction=0.5, seed=0)
    assert counts == {"noto": 4, "twemoji": 4, "openmoji": 4, "fluent": 3}
    rows = _rows(tmp_path)
    assert {r["concept"] for r in rows["train"]} == {"1f34e", "1f1ef-1f1f5"}
    assert {r["concept"] for r in rows["validation"]} == {"1f44b", "1f44b-1f3fd"}  # the variant follows 👋
    kinds = {
        "1f34e": ("Food & Drink", "food-fruit"),  # from openmoji's data: emoji.json lacks it
        "1f44b": ("People & Body", "hand-fingers-open"),
        "1f44b-1f3fd": ("People & Body", "hand-fingers-open"),
        "1f1ef-1f1f5": ("Flags", "country-flag"),
    }
    pixels = {}
    for split, split_rows in rows.items():
        for row in split_rows:
            assert set(row) == COLUMNS
            assert row["file_name"] == f"{row['style']}_{row['concept']}.png"
            assert row["text"] == NAMES[row["concept"]]
            assert (row["category"], row["subcategory"]) == kinds[row["concept"]]
            assert row["skin_tone"] == (row["concept"] == "1f44b-1f3fd")
            image = Image.open(tmp_path / split / row["file_name"])
            assert image.mode == "RGB" and image.size == (24, 24)
            for corner in ((0, 0), (23, 0), (0, 23), (23, 23)):
                assert min(image.getpixel(corner)) >= 250
            assert min(image.getpixel((12, 12))) < 200  # the emoji fills the middle
            pixels[row["style"], row["concept"]] = image.tobytes()
    assert len(set(pixels.values())) == len(pixels) == 15
    info = json.loads((tmp_path / "emoji_corpus.json").read_text())
    assert info["counts"]["fluent"] == {"train": 1, "validation": 2}
    assert info["concepts"] == {"train": 2, "validation": 2}
    assert info["licences"]["openmoji"] == {"licence": "CC-BY-SA-4.0", "version": None}


def test_no_skin_tones_leaves_out_the_variants(tmp_path):
    counts = _build(tmp_path, styles=("twemoji", "fluent"), skin_tones=False)
    assert counts == {"twemoji": 3, "fluent": 2}
    rows = [r for split_rows in _rows(tmp_path).values() for r in split_rows]
    assert len(rows) == 5 and not any(r["skin_tone"] for r in rows)
    assert {r["style"] for r in rows} == {"twemoji", "fluent"}


def test_build_is_deterministic_whatever_the_worker_count(tmp_path):
    _build(tmp_path / "a", heldout_fraction=0.5, seed=0)
    _build(tmp_path / "b", heldout_fraction=0.5, seed=0, workers=2)
    assert folder_digest(tmp_path / "a") == folder_digest(tmp_path / "b")
    table = emoji.concepts()
    other = next(s for s in range(1, 100) if emoji.split_of(table["1f44b"], s, 0.5) == "train")
    _build(tmp_path / "c", heldout_fraction=0.5, seed=other)
    assert folder_digest(tmp_path / "a") != folder_digest(tmp_path / "c")


def test_noto_rejects_what_the_font_cannot_draw():
    font = str(FIXTURES / "noto" / "NotoColorEmoji.ttf")
    assert emoji._render_noto("🇯🇵", font) is not None
    assert emoji._render_noto("\U0001f1ef\U0001f1ef", font) is None  # the font's "unknown flag"
    assert emoji._render_noto("😀", font) is None  # not in the font
    assert emoji._render_noto("🍎\U0001f3fd", font) is None  # no such sequence: two glyphs


def test_missing_tools_raise_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    for style, tool in (("noto", "apt-get"), ("twemoji", "npm"), ("fluent", "npm")):
        with pytest.raises(RuntimeError, match=f"needs `{tool}`") as caught:
            _build(tmp_path / "out", styles=[style], cache_dir=tmp_path / "cache")
        assert isinstance(caught.value, ValueError)  # so `vqclip` prints it without a traceback
    assert not (tmp_path / "cache").exists()


def _tool(folder, name, body):
    path = folder / name
    path.write_text(f"#!{sys.executable}\nimport sys\n{body}\n")
    path.chmod(0o755)


def test_failed_fetch_says_what_to_do(tmp_path, monkeypatch):
    tools = tmp_path / "bin"
    tools.mkdir()
    _tool(tools, "apt-get", "sys.exit('E: Unable to locate package fonts-noto-color-emoji')")
    _tool(tools, "dpkg-deb", "")
    _tool(tools, "npm", "sys.exit('npm error code ENOTFOUND')")
    monkeypatch.setenv("PATH", str(tools))
    with pytest.raises(RuntimeError, match="Unable to locate package.*run `apt-get update` once"):
        _build(tmp_path / "out", styles=["noto"], cache_dir=tmp_path / "cache")
    with pytest.raises(RuntimeError, match="ENOTFOUND.*npm registry"):
        _build(tmp_path / "out", styles=["openmoji"], cache_dir=tmp_path / "cache")


def test_fetch_fills_the_cache_once(tmp_path, monkeypatch):
    tools, log = tmp_path / "bin", tmp_path / "calls.log"
    tools.mkdir()
    fixtures = {"emoji-datasource-twitter": "twemoji", "@iconify-json/fluent-emoji-flat": "fluent"}
    _tool(
        tools,
        "npm",
        f"""import io, json, tarfile
from pathlib import Path
with open({str(log)!r}, "a") as f:
    f.write(sys.argv[2] + "\\n")
with tarfile.open("package.tgz", "w:gz") as tar:
    tar.add(Path({str(FIXTURES)!r}) / {fixtures!r}[sys.argv[2]], arcname="package")
    for name, data in (("package.json", b'{{"version": "1.0.0"}}'), ("unwanted.txt", b"")):
        info = tarfile.TarInfo("package/" + name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))""",
    )
    monkeypatch.setenv("PATH", str(tools))
    cache = tmp_path / "cache"
    for _ in range(2):
        assert _build(tmp_path / "out", styles=["fluent"], cache_dir=cache) == {"fluent": 3}
    assert log.read_text().splitlines() == ["@iconify-json/fluent-emoji-flat", "emoji-datasource-twitter"]
    assert sorted(p.name for p in cache.iterdir()) == ["fluent", "twemoji"]
    assert sorted(p.name for p in (cache / "fluent").iterdir()) == ["chars.json", "icons.json", "source.json"]
    info = json.loads((tmp_path / "out" / "emoji_corpus.json").read_text())
    assert info["licences"] == {"fluent": {"licence": "MIT", "version": "1.0.0"}}


def test_noto_needs_raqm(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji.features, "check", lambda name: name != "raqm")
    with pytest.raises(RuntimeError, match="RAQM"):
        _build(tmp_path, styles=["noto"])


def test_bad_arguments_are_refused(tmp_path):
    bad = ({"styles": ["noto", "emojione"]}, {"styles": []}, {"resolution": 4}, {"heldout_fraction": 0})
    for kwargs in bad:
        with pytest.raises(ValueError):
            _build(tmp_path, **kwargs)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VQCLIP_CACHE", str(tmp_path))
    assert emoji.default_cache_dir() == tmp_path / "emoji"
    monkeypatch.delenv("VQCLIP_CACHE")
    assert emoji.default_cache_dir() == Path.home() / ".cache" / "vqclip" / "emoji"


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    emoji.add_cli(parser.add_subparsers())
    defaults = parser.parse_args(["emoji", "--out", "x"])
    assert defaults.styles == "noto,twemoji,openmoji,fluent" and defaults.resolution == 64
    assert defaults.skin_tones and defaults.heldout_fraction == 0.1 and defaults.seed == 0
    assert defaults.cache_dir is None
    args = parser.parse_args(
        ["emoji", "--out", str(tmp_path), "--cache-dir", str(FIXTURES), "--styles", "twemoji,openmoji"]
        + ["--resolution", "16", "--no-skin-tones", "--workers", "1"]
    )
    args.func(args)
    assert "wrote 6 images (twemoji 3, openmoji 3)" in capsys.readouterr().out
    assert Image.open(next((tmp_path / "train").glob("*.png"))).size == (16, 16)


def test_build_at_128_px_says_which_styles_are_upscaled(tmp_path, capsys):
    counts = _build(tmp_path, resolution=128, heldout_fraction=0.5, progress=True)
    assert counts == {"noto": 4, "twemoji": 4, "openmoji": 4, "fluent": 3}
    assert "note: at 128 px, twemoji (64 px) are upscaled" in capsys.readouterr().err
    info = json.loads((tmp_path / "emoji_corpus.json").read_text())
    assert info["resolution"] == 128 and info["upscaled_from_px"] == {"twemoji": 64}
    for split, split_rows in _rows(tmp_path).items():
        for row in split_rows:
            image = Image.open(tmp_path / split / row["file_name"])
            assert image.size == (128, 128)
            assert min(image.getpixel((0, 0))) >= 250 and min(image.getpixel((64, 64))) < 200
    _build(tmp_path / "small", resolution=64, progress=True)
    assert "upscaled" not in capsys.readouterr().err
    assert json.loads((tmp_path / "small" / "emoji_corpus.json").read_text())["upscaled_from_px"] == {}


def test_the_command_builds_offline_from_a_cache(tmp_path, monkeypatch, capsys):
    from app.cli import main

    monkeypatch.setattr(shutil, "which", lambda name: None)  # no apt-get, no npm
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a[0]} although the cache is full"))
    argv = ["data", "emoji", "--out", str(tmp_path / "emoji"), "--cache-dir", str(FIXTURES), "--resolution", "16"]
    assert main([*argv, "--workers", "1"]) == 0
    assert "(noto 4, twemoji 4, openmoji 4, fluent 3)" in capsys.readouterr().out
