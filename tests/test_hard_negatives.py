"""Hard-negative classes: a mimic trained as a class of its own, folded into background at inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.handlers import MeanDice

from custom.checkpoints import save_checkpoint
from custom.cli import main
from custom.errors import ConfigError
from custom.inference.negatives import FoldIntoBackground, checked_classes, fold_into_background
from custom.networks import holohisto_tiny, network_config
from custom.training import class_dice_metrics
from custom.wsi.reader import open_mask

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "holohisto_bundle" / "configs"


def test_folded_net_gives_background_the_mimic_probability_and_keeps_the_rest():
    torch.manual_seed(0)
    net = holohisto_tiny(num_classes=3).eval()
    folded = fold_into_background(net, [2], 3)
    assert isinstance(folded, FoldIntoBackground) and folded.network is net  # shared, not copied
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        p, q = net(x).softmax(1), folded(x).softmax(1)
    assert q.shape == (1, 2, 256, 256)
    torch.testing.assert_close(q[:, 0], p[:, 0] + p[:, 2], atol=1e-5, rtol=0)
    torch.testing.assert_close(q[:, 1], p[:, 1], atol=1e-5, rtol=0)
    assert fold_into_background(net, [], 3) is net


@pytest.mark.parametrize("classes", [[1], [0, 2], [1, 2], [3]])
def test_folded_classes_must_be_the_highest_labels_and_leave_one_class(classes):
    with pytest.raises(ConfigError, match="highest labels of a net with 3 classes"):
        checked_classes(classes, 3)


def _parser(*overrides: str | dict) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "tiny.json")])
    for extra in overrides:
        parser.update(extra if isinstance(extra, dict) else ConfigParser.load_config_file(CONFIGS / extra))
    parser["bundle_root"] = str(REPO / "holohisto_bundle")
    return parser


def test_training_config_records_the_folded_classes_and_rejects_a_bad_choice_before_training():
    parser = _parser("hard_negative_class.json")
    assert parser.get_parsed_content("network_def").config["num_classes"] == 3
    assert parser.get_parsed_content("input_record").config["background_classes"] == [2]
    assert _parser().get_parsed_content("input_record").config["background_classes"] == []
    with pytest.raises(RuntimeError) as err:  # MONAI wraps the ConfigError of a config expression
        _parser({"background_classes": [1]}).get_parsed_content("input_record")
    cause = err.value.__cause__
    assert isinstance(cause, ConfigError)
    assert "background_classes [1] must be the highest labels of a net with 2 classes" in str(cause)


def test_validation_scores_the_mimic_class_apart_from_the_mean():
    metrics = _parser("hard_negative_class.json").get_parsed_content("validate#evaluator#additional_metrics")
    assert set(metrics) == {"val_dice_glomerulus", "val_dice_glomerulus_mimic"}
    assert _parser().get_parsed_content("validate#evaluator#additional_metrics") == {}  # 2 classes: the mean

    # rows 0-3 glomerulus, rows 4-5 mimic; the net calls the mimic glomerulus
    label = torch.zeros(8, 8, dtype=torch.long)
    label[:4], label[4:6] = 1, 2
    pred = torch.where(label == 2, 1, label)

    def onehot(x):
        return torch.nn.functional.one_hot(x, 3).permute(2, 0, 1).float()

    engine = Engine(lambda engine, batch: [{"pred": onehot(pred), "label": onehot(label)}])
    for name, metric in metrics.items():
        metric.attach(engine, name)
    MeanDice(include_background=False, output_transform=lambda o: ([o[0]["pred"]], [o[0]["label"]])).attach(
        engine, "val_mean_dice"
    )
    scores = engine.run([0], max_epochs=1).metrics
    assert scores["val_dice_glomerulus"] == pytest.approx(2 * 32 / (48 + 32))
    assert scores["val_dice_glomerulus_mimic"] == 0.0
    assert scores["val_mean_dice"] == pytest.approx(0.4)  # the mean alone reads as a middling net
    assert class_dice_metrics(3, {}).keys() == {"val_dice_class_1", "val_dice_class_2"}


def _mimic_everywhere(path: Path, background_classes: list[int]) -> Path:
    """A tiny 3-class net whose logits say "mimic" (class 2) at every pixel, whatever the input."""
    net = holohisto_tiny(num_classes=3)
    conv = net.head.to_logits[0]  # then PixelShuffle(2): output class c is input channels 4c..4c+3
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.bias[8:] = 10.0
    record = {
        "patch_size": [512, 512],
        "patch_level": 1,
        "patch_mpp": None,
        "class_names": {"1": "Glomerulus", "2": "Glomerulus mimic"},
        "background_classes": background_classes,
    }
    return save_checkpoint(path, net, network_config(net), input_config=record)


def test_segment_writes_a_mimic_class_as_background_only_when_the_checkpoint_folds_it(slides_dir, tmp_path):
    slide = slides_dir / "derived" / "CMU-1-Small-Region.generic.tif"
    values = {}
    for name, folded in (("kept", []), ("folded", [2])):
        checkpoint = _mimic_everywhere(tmp_path / f"{name}.pt", folded)
        out = tmp_path / name
        main(["segment", str(slide), "--out", str(out), "--checkpoint", str(checkpoint)])
        with open_mask(out / "CMU-1-Small-Region.generic_pred.tiff") as mask:
            assert mask.level_shapes[0] == (2967, 2220)
            values[name] = np.unique(mask.read_level(len(mask.level_shapes) - 1))
    assert 2 in values["kept"]  # the same weights, unfolded, call the tissue "mimic"
    assert values["folded"].tolist() == [0]
