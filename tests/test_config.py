"""Recipe loading: overrides, path resolution, and the exact one-line error for each malformed recipe."""

from pathlib import Path

import pytest
import yaml

from continual_opd.cli import main
from continual_opd.config import load_recipe
from continual_opd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "name": "t",
    "output_dir": "runs/t",
    "stages": [
        {"name": "baseline", "kind": "eval"},
        {"name": "sft", "kind": "sft", "data": {"documents": ["docs"], "chat": ["chat.jsonl"],
                                                  "mix": {"documents": 0.7, "chat": 0.3}}},
        {"name": "opd", "kind": "opd", "teacher": "snapshot:before-sft", "prompts": ["p.jsonl"]},
    ],
}


def write(tmp_path, data, text=None):
    p = tmp_path / "r.yaml"
    p.write_text(text if text is not None else yaml.safe_dump(data))
    return p


def patched(**changes):
    import copy

    d = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = d
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        last = keys[-1]
        if value is DELETE:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return d


DELETE = object()

# (recipe, expected error message after the `<file>: ` prefix)
MALFORMED = [
    (patched(stages__1__lrr=1e-4), "stages.1.lrr: unknown key; did you mean 'lr'?"),
    (patched(modle={"name": "demo"}), "modle: unknown key; did you mean 'model'?"),
    (patched(stages__2__tempreature=0.7), "stages.2.tempreature: unknown key; did you mean 'temperature'?"),
    (patched(stages__0__kind="train"), "stages.0.kind: 'train' is not a stage kind; use one of eval, sft, opd"),
    (patched(output_dir=DELETE), "output_dir: required field is missing; add `output_dir: ...`"),
    (patched(stages__1__lr=-1.0), "stages.1.lr: Input should be greater than 0 (got -1.0)"),
    (patched(stages__1__steps="many"),
     "stages.1.steps: Input should be a valid integer, unable to parse string as an integer (got 'many')"),
    (patched(stages__1__data__mix={"documents": 0.7, "chat": 0.4}),
     "stages.1.data: mix weights sum to 1.1; make them sum to 1 (e.g. documents: 0.7, chat: 0.3)"),
    (patched(stages__1__data__mix={"documents": 0.5, "qa": 0.5}),
     "stages.1.data: mix.qa is 0.5 but `qa` lists no sources; add a source or set mix.qa: 0"),
    (patched(stages__1__finetune="qlora"), "stages.1.finetune: Input should be 'full' or 'lora' (got 'qlora')"),
    (patched(stages__2__loss="kl"),
     "stages.2.loss: Input should be 'sampled', 'full', 'forward' or 'jsd' (got 'kl')"),
    (patched(stages__2__prompts=[]),
     "stages.2: `prompts` is empty; list at least one prompts .jsonl (e.g. data_samples/chat/opd_prompts.jsonl)"),
    (patched(stages=[{"name": "a", "kind": "eval"}, {"name": "a", "kind": "eval"}]),
     "stages: stage name 'a' is used twice; give each stage a unique name (got [...])"),
    (patched(stages__1__lora={"rank": 8}),
     "stages.1.lora.rank: unknown key; valid keys: alpha, dropout, modules_to_save, r, target_modules"),
    (patched(report_to=["mlflow"]), "report_to.0: Input should be 'tensorboard' or 'wandb' (got 'mlflow')"),
    (patched(stages__2__beta=0.3),
     "stages.2: `beta` only applies to loss: jsd (this stage uses loss: sampled); remove it or set loss: jsd"),
    (patched(stages__2__loss="full", stages__2__gamma=0.9),
     "stages.2: `gamma` only applies to loss: sampled (this stage uses loss: full); remove it or set loss: sampled"),
    (patched(stages__2__doc_prompt_fraction=0.25),
     "stages.2: doc_prompt_fraction is 0.25 but `doc_prompts` lists no files; add a QA .jsonl to doc_prompts or "
     "set doc_prompt_fraction: 0"),
    (patched(stages__1__lr_scheduler="constant_with_warmup"),
     "stages.1.lr_scheduler: Input should be 'constant', 'linear' or 'cosine' (got 'constant_with_warmup')"),
    (patched(stages__2__lr_scheduler="step"),
     "stages.2.lr_scheduler: Input should be 'constant', 'linear' or 'cosine' (got 'step')"),
]


@pytest.mark.parametrize("data,expected", MALFORMED, ids=[m[1].split(":")[0] for m in MALFORMED])
def test_malformed_recipe_gives_exact_one_line_error(tmp_path, data, expected):
    p = write(tmp_path, data)
    with pytest.raises(ConfigError) as ei:
        load_recipe(p)
    msg = str(ei.value)
    expected = expected.replace(" (got [...])", "")
    assert msg == f"{p}: {expected}"
    assert "\n" not in msg


def test_invalid_yaml_names_the_line(tmp_path):
    p = write(tmp_path, None, text="name: t\noutput_dir: x\nstages: [\n  {name: a, kind: eval\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:\d+: invalid YAML"):
        load_recipe(p)


def test_missing_and_empty_recipe(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="recipe is empty"):
        load_recipe(write(tmp_path, None, text=""))


def test_overrides_win_and_paths_resolve(tmp_path):
    p = write(tmp_path, BASE)
    r = load_recipe(p, ["stages.1.lr=1e-4", "output_dir=/tmp/x", "seed=3", "stages.2.loss=full"])
    assert r.stages[1].lr == 1e-4 and r.output_dir == "/tmp/x" and r.seed == 3 and r.stages[2].loss == "full"
    assert r.stages[1].data.documents == [str(tmp_path / "docs")]  # relative to the recipe file
    assert r.stages[2].prompts == [str(tmp_path / "p.jsonl")]


def test_override_errors(tmp_path):
    p = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_recipe(p, ["stages.1.lr"])
    with pytest.raises(ConfigError, match=r"stages.7 is not an index of a 3-item list; use 0..2"):
        load_recipe(p, ["stages.7.lr=1"])
    with pytest.raises(ConfigError, match=r"stages.1.lrr: unknown key; did you mean 'lr'\?"):
        load_recipe(p, ["stages.1.lrr=1"])


def test_lr_defaults_depend_on_finetune_mode(tmp_path):
    r = load_recipe(write(tmp_path, patched(stages__1__finetune="lora")))
    assert r.stages[1].learning_rate == 1e-4
    r = load_recipe(write(tmp_path, BASE))
    assert r.stages[1].learning_rate == 2e-5


def test_cli_validate_exit_codes(tmp_path, capsys):
    p = write(tmp_path, patched(stages__1__lrr=1))
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {p}: stages.1.lrr: unknown key; did you mean 'lr'?"]


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe, capsys, monkeypatch):
    hub_model = yaml.safe_load(recipe.read_text())["model"]["name"]
    if "/" in hub_model and not hub_model.startswith((".", "/")):  # a hub id: offline, validate says it is missing
        assert main(["validate", str(recipe)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: model.name '{hub_model}': not in the local hub cache and HF_HUB_OFFLINE is set; download it on a "
            "connected machine first, or point it at a local directory")
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online, the hub is asked when the run starts
    assert main(["validate", str(recipe)]) == 0, capsys.readouterr().err


def test_shipped_accelerate_configs_load_and_are_referenced():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    repo = Path(__file__).resolve().parents[1]
    kinds = {"ddp": "MULTI_GPU", "fsdp2": "FSDP", "zero3": "DEEPSPEED"}
    for name, kind in kinds.items():
        cfg = load_config_from_file(str(repo / "recipes/accelerate" / f"{name}.yaml"))
        assert cfg.distributed_type.value == kind and not cfg.use_cpu
    assert load_config_from_file(str(repo / "recipes/accelerate/fsdp2.yaml")).fsdp_config["fsdp_version"] == 2
    assert "recipes/accelerate/ddp.yaml" in (repo / "recipes/qwen3-8b-personalize.yaml").read_text()


@pytest.mark.parametrize("name", ["personalize", "sft-docs-only", "qwen3-8b-personalize", "smollm2-personalize",
                                  "smollm2-sft-docs-only", "smollm2-docs-only-opd"])
def test_a_resolved_recipe_validates_again(name):
    """run dirs keep recipe.resolved.yaml (every option, with its value); --resume and --from-run re-read it"""
    from pathlib import Path

    import yaml

    from continual_opd.config import load_recipe, recipe_to_yaml, validate_recipe_dict

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml")
    again = validate_recipe_dict(yaml.safe_load(recipe_to_yaml(recipe)), "resolved")
    assert recipe_to_yaml(again) == recipe_to_yaml(recipe)


PEER_ALIASES = {"learning_rate": ("lr", 3e-4), "max_steps": ("steps", 7), "eval_steps": ("eval_every", 5),
                "save_steps": ("save_every", 5), "gradient_accumulation_steps": ("grad_accum", 4),
                "max_seq_length": ("max_seq_len", 512), "lr_scheduler_type": ("lr_scheduler", "cosine")}


@pytest.mark.parametrize("alias", sorted(PEER_ALIASES))
def test_peer_spellings_are_accepted_and_resolved_to_our_names(tmp_path, alias):
    from continual_opd.config import recipe_to_yaml

    field, value = PEER_ALIASES[alias]
    r = load_recipe(write(tmp_path, patched(**{f"stages__1__{alias}": value})))
    assert getattr(r.stages[1], field) == value
    resolved = yaml.safe_load(recipe_to_yaml(r))["stages"][1]
    assert resolved[field] == value and alias not in resolved  # one recipe for --from-run and compare
    # from the command line too
    r = load_recipe(write(tmp_path, BASE), [f"stages.1.{alias}={value}"])
    assert getattr(r.stages[1], field) == value


def test_an_alias_and_its_field_together_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^\S+: stages.1: `learning_rate` is another name for `lr` and both are "
                                          r"set; keep only `lr`"):
        load_recipe(write(tmp_path, patched(stages__1__learning_rate=1e-4, stages__1__lr=2e-4)))


@pytest.mark.parametrize("key,expected", [
    ("num_train_epochs", "a stage runs `steps` optimizer updates over a token-ratio mix"),
    ("per_device_train_batch_size", "`batch_size` is the global batch"),
    ("warmup_ratio", "use `warmup_steps`"),
    ("logging_steps", "every step is logged"),
])
def test_peer_names_without_an_equivalent_name_the_field_to_use(tmp_path, key, expected):
    p = write(tmp_path, patched(**{f"stages__1__{key}": 1}))
    with pytest.raises(ConfigError) as ei:
        load_recipe(p)
    assert str(ei.value).startswith(f"{p}: stages.1.{key}: unknown key; {expected}")
    assert "did you mean" not in str(ei.value)


def test_no_hint_suggests_a_field_with_another_meaning(tmp_path):
    # look-alikes that difflib would pair at a low cutoff: gradient_* -> gradient_checkpointing, *_steps -> steps
    for key in ("gradient_accumulation", "eval_step_count", "warmup_fraction", "checkpoint_steps"):
        with pytest.raises(ConfigError) as ei:
            load_recipe(write(tmp_path, patched(**{f"stages__1__{key}": 1})))
        assert "did you mean" not in str(ei.value), key


def test_a_peer_spelling_on_the_command_line_overrides_the_files_field(tmp_path):
    p = write(tmp_path, patched(stages__1__lr=1e-4, stages__1__max_steps=9))
    r = load_recipe(p, ["stages.1.learning_rate=3e-4", "stages.1.steps=4"])
    assert r.stages[1].lr == 3e-4 and r.stages[1].steps == 4
