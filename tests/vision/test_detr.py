"""Tests for ``dlabc.vision.detr``.

Box conversions are compared with their inverses and hand values; IoU and the
generalised IoU with areas counted pixel by pixel on integer boxes (brute force); the
Hungarian method with ``scipy.optimize.linear_sum_assignment`` (equal total cost on
random, tied, rectangular and empty costs) and with trying every permutation; average
precision with hand-worked precision-recall curves, boxes shifted by a known IoU, and a
brute-force evaluation written separately here (loops over detections and a
step-function integral of the interpolated precision). The model, with random weights
copied through the renaming table, is compared with Hugging Face's
``DetrForObjectDetection`` (a tiny config with a non-timm ResNet backbone, float64): the
position encoding, the logits and boxes, the matching (HF's matcher uses scipy) and the
set loss; :func:`detect` with HF's ``post_process_object_detection``. The backbone's
pre-training places a digit of known ink at the canvases' heights (measured in pixels);
:func:`train_detr` leaves a given backbone's weights unchanged.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from transformers.loss.loss_for_object_detection import HungarianMatcher
from transformers.models.detr.modeling_detr import DetrSinePositionEmbedding
from transformers.utils import logging

from dlabc.vision.detr import (
    DETR,
    Backbone,
    DETRConfig,
    LossWeights,
    _paste_at_one_scale,
    average_precision,
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    detect,
    detr_from_hf_state_dict,
    generalized_box_iou,
    hungarian,
    match,
    mean_average_precision,
    pretrain_backbone,
    set_loss,
    sine_position_encoding,
    train_detr,
)
from transformers import (
    DetrConfig,
    DetrForObjectDetection,
    DetrImageProcessor,
    ResNetConfig,
)

logging.set_verbosity_error()
F64 = dict(atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------- boxes


def _random_int_boxes(n: int, gen: torch.Generator, size: int = 20) -> torch.Tensor:
    corners = torch.randint(0, size, (n, 2, 2), generator=gen)
    lo = corners.min(1).values
    hi = corners.max(1).values + 1  # never empty
    return torch.cat([lo, hi], 1).double()  # (n, 4) xyxy


def _raster(box: torch.Tensor, size: int = 24) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    mask[y0:y1, x0:x1] = True
    return mask


def test_box_conversions_invert_each_other_and_match_hand_values():
    xyxy = torch.tensor([[1.0, 2.0, 5.0, 10.0]], dtype=torch.float64)
    cxcywh = box_xyxy_to_cxcywh(xyxy)
    torch.testing.assert_close(cxcywh, torch.tensor([[3.0, 6.0, 4.0, 8.0]]).double())
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), xyxy, **F64)
    batch = torch.rand(2, 3, 4, dtype=torch.float64)  # any leading dimensions
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(batch)), batch)
    torch.testing.assert_close(box_area(xyxy), torch.tensor([32.0]).double())


def test_iou_and_giou_equal_pixel_counts():
    gen = torch.Generator().manual_seed(0)
    a, b = _random_int_boxes(7, gen), _random_int_boxes(5, gen)
    iou, giou = box_iou(a, b), generalized_box_iou(a, b)
    assert iou.shape == (7, 5) and giou.shape == (7, 5)
    for i, j in itertools.product(range(7), range(5)):
        ma, mb = _raster(a[i]), _raster(b[j])
        inter, union = (ma & mb).sum(), (ma | mb).sum()
        ys, xs = np.nonzero(ma | mb)
        hull = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert iou[i, j].item() == pytest.approx(inter / union, abs=1e-12)
        expected = inter / union - (hull - union) / hull
        assert giou[i, j].item() == pytest.approx(expected, abs=1e-12)


def test_giou_is_negative_for_distant_boxes_and_one_for_equal_ones():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    far = torch.tensor([[3.0, 0.0, 4.0, 1.0]])  # hull 4, union 2: -0.5
    assert generalized_box_iou(a, far).item() == pytest.approx(-0.5)
    assert generalized_box_iou(a, a).item() == pytest.approx(1.0)
    assert box_iou(a, far).item() == 0.0


def test_box_functions_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"a must have shape \(N, 4\)"):
        box_iou(torch.zeros(3, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="b must have 2 dimensions"):
        generalized_box_iou(torch.zeros(3, 4), torch.zeros(4))
    with pytest.raises(TypeError, match="a must be a floating-point"):
        box_iou(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(2, 4))


# ---------------------------------------------------------------- Hungarian


def _total(cost: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> float:
    return float(cost[rows, cols].sum())


@pytest.mark.parametrize("shape", [(1, 1), (5, 5), (9, 3), (3, 9), (10, 1), (17, 17)])
def test_hungarian_equals_scipy_on_random_costs(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    for _ in range(5):
        cost = torch.randn(*shape, generator=gen, dtype=torch.float64)
        rows, cols = hungarian(cost)
        ref_rows, ref_cols = linear_sum_assignment(cost.numpy())
        assert len(rows) == min(shape) and rows.dtype == torch.int64
        assert rows.tolist() == sorted(rows.tolist())  # listed by row, as scipy
        assert len(set(cols.tolist())) == len(cols)  # each column at most once
        assert _total(cost, rows, cols) == pytest.approx(
            float(cost.numpy()[ref_rows, ref_cols].sum()), abs=1e-10
        )


def test_hungarian_on_ties_and_integer_costs():
    gen = torch.Generator().manual_seed(3)
    for shape in [(6, 6), (8, 4), (4, 8)]:
        cost = torch.randint(0, 3, shape, generator=gen)  # many ties, int dtype
        rows, cols = hungarian(cost)
        ref = linear_sum_assignment(cost.numpy())
        assert _total(cost, rows, cols) == float(cost.numpy()[ref].sum())
    rows, cols = hungarian(torch.zeros(4, 4))  # everything tied
    assert sorted(cols.tolist()) == [0, 1, 2, 3]


def test_hungarian_equals_brute_force_over_permutations():
    gen = torch.Generator().manual_seed(1)
    cost = torch.rand(6, 4, generator=gen, dtype=torch.float64)
    best = min(
        sum(cost[r, c].item() for c, r in enumerate(perm))
        for perm in itertools.permutations(range(6), 4)
    )
    assert _total(cost, *hungarian(cost)) == pytest.approx(best, abs=1e-12)


def test_hungarian_with_no_targets_and_bad_input():
    rows, cols = hungarian(torch.zeros(10, 0))
    assert rows.shape == (0,) and cols.shape == (0,) and rows.dtype == torch.int64
    with pytest.raises(ValueError, match="cost must have 2 dimensions"):
        hungarian(torch.zeros(3))
    with pytest.raises(ValueError, match="cost must be finite"):
        hungarian(torch.tensor([[0.0, float("inf")], [1.0, 2.0]]))
    with pytest.raises(TypeError, match="cost must be a torch.Tensor"):
        hungarian(np.zeros((2, 2)))


# ---------------------------------------------------------------- average precision


def _brute_force_ap(predictions, targets, threshold, n_classes):
    """VOC 2010+ AP written with loops: greedy matching by score, then the integral
    over recall of the best precision at that recall or beyond."""
    aps = []
    for c in range(n_classes):
        n_targets = sum(int((np.asarray(t[1]) == c).sum()) for t in targets)
        if n_targets == 0:
            continue
        detections = []  # (score, image, box)
        for i, (boxes, scores, labels) in enumerate(predictions):
            for box, score, label in zip(boxes, scores, labels, strict=True):
                if int(label) == c:
                    detections.append((float(score), i, np.asarray(box, float)))
        detections.sort(key=lambda d: -d[0])
        taken = set()
        points = []  # (recall, precision) after each detection
        hits = 0
        for k, (_, i, box) in enumerate(detections, start=1):
            best, best_j = threshold, None
            for j, (t_box, t_label) in enumerate(zip(*targets[i], strict=True)):
                if int(t_label) != c or (i, j) in taken:
                    continue
                t_box = np.asarray(t_box, float)
                w = min(box[2], t_box[2]) - max(box[0], t_box[0])
                h = min(box[3], t_box[3]) - max(box[1], t_box[1])
                inter = max(w, 0) * max(h, 0)
                area = (box[2] - box[0]) * (box[3] - box[1])
                t_area = (t_box[2] - t_box[0]) * (t_box[3] - t_box[1])
                iou = inter / (area + t_area - inter)
                if iou >= best and (best_j is None or iou > best):
                    best, best_j = iou, j
            if best_j is not None:
                taken.add((i, best_j))
                hits += 1
            points.append((hits / n_targets, hits / k))
        levels = sorted({0.0} | {r for r, _ in points})
        area = 0.0
        for low, high in zip(levels[:-1], levels[1:], strict=True):
            area += (high - low) * max(p for r, p in points if r >= high)
        aps.append(area)
    return float(np.mean(aps))


def _random_detection_set(seed: int, n_images: int = 6, n_classes: int = 3):
    rng = np.random.default_rng(seed)
    predictions, targets = [], []
    for _ in range(n_images):
        m = int(rng.integers(0, 4))
        t_boxes = (
            rng.uniform(0, 40, (m, 2)).repeat(2, 1)
            + np.c_[np.zeros((m, 2)), rng.uniform(5, 20, (m, 2))]
        )
        t_labels = rng.integers(0, n_classes, m)
        jitter = rng.normal(0, 3, (m, 4))
        k = int(rng.integers(0, 6))
        extra = (
            rng.uniform(0, 40, (k, 2)).repeat(2, 1)
            + np.c_[np.zeros((k, 2)), rng.uniform(5, 20, (k, 2))]
        )
        boxes = np.concatenate([t_boxes + jitter, extra]).astype(np.float32)
        labels = np.concatenate([t_labels, rng.integers(0, n_classes, k)])
        scores = rng.uniform(size=len(boxes))
        predictions.append((torch.from_numpy(boxes), torch.from_numpy(scores), labels))
        targets.append((t_boxes.astype(np.float32), t_labels))
    return predictions, targets


def test_average_precision_equals_brute_force():
    for seed in range(5):
        predictions, targets = _random_detection_set(seed)
        if not any(len(t[1]) for t in targets):
            continue
        for threshold in (0.3, 0.5, 0.75):
            ours = average_precision(predictions, targets, threshold, n_classes=3)
            ref = _brute_force_ap(predictions, targets, threshold, 3)
            assert ours == pytest.approx(ref, abs=1e-12)


def test_average_precision_of_a_hand_worked_curve():
    # one class, three targets in two images; detections by decreasing score are
    # hit, miss, hit, miss, hit: precision 1, 1/2, 2/3, 1/2, 3/5 at recall
    # 1/3, 1/3, 2/3, 2/3, 1, so AP = (1 + 2/3 + 3/5) / 3 = 34/45
    box = np.array([[0.0, 0.0, 10.0, 10.0]], dtype=np.float32)
    other = np.array([[20.0, 20.0, 30.0, 30.0]], dtype=np.float32)
    far = np.array([[50.0, 50.0, 60.0, 60.0]], dtype=np.float32)
    targets = [(np.concatenate([box, other]), np.array([0, 0])), (box, np.array([0]))]
    predictions = [
        (
            np.concatenate([box, far, other, box]),  # the second hit on box: a miss
            np.array([0.9, 0.8, 0.7, 0.6]),
            np.array([0, 0, 0, 0]),
        ),
        (box, np.array([0.5]), np.array([0])),
    ]
    assert average_precision(predictions, targets, n_classes=1) == pytest.approx(
        34 / 45, abs=1e-12
    )


def test_perfect_predictions_and_shifted_boxes():
    rng = np.random.default_rng(0)
    targets = []
    for _ in range(4):  # two boxes 20 px apart per image: shifts keep them apart
        xy = np.float32([[0, 0], [20, 0]]) + rng.uniform(0, 40, 2).astype(np.float32)
        targets.append((np.c_[xy, xy + 10], rng.integers(0, 10, 2)))
    perfect = [(b, np.ones(len(b)), lab) for b, lab in targets]
    assert average_precision(perfect, targets) == 1.0
    assert mean_average_precision(perfect, targets) == 1.0
    # a shift of 2 px along x of a 10-px box: IoU = 8 / 12 = 2/3, so AP is 1 at the
    # thresholds 0.50..0.65 and 0 at 0.70..0.95: mAP = 4/10
    shifted = [(b + np.float32([2, 0, 2, 0]), s, lab) for b, s, lab in perfect]
    assert average_precision(shifted, targets, iou_threshold=0.65) == 1.0
    assert average_precision(shifted, targets, iou_threshold=0.7) == 0.0
    assert mean_average_precision(shifted, targets) == pytest.approx(0.4)
    # no predictions at all: AP 0; a class never in the targets is left out
    empty = [(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64))] * 4
    assert average_precision(empty, targets) == 0.0


def test_average_precision_rejects_bad_input():
    targets = [(np.zeros((1, 4), dtype=np.float32) + [0, 0, 1, 1], np.array([0]))]
    good = [
        (torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.ones(1), torch.zeros(1).long())
    ]
    with pytest.raises(ValueError, match="one entry per image"):
        average_precision(good * 2, targets)
    with pytest.raises(ValueError, match="iou_threshold must be in"):
        average_precision(good, targets, iou_threshold=1.5)
    with pytest.raises(ValueError, match=r"labels must lie in 0..9"):
        average_precision(good, [(targets[0][0], np.array([12]))])
    with pytest.raises(ValueError, match="one score per box"):
        average_precision([(good[0][0], torch.ones(2), good[0][2])], targets)
    with pytest.raises(ValueError, match="at least one box"):
        average_precision(good, [(np.zeros((0, 4)), np.zeros(0, dtype=np.int64))])
    with pytest.raises(TypeError, match="must be lists"):
        mean_average_precision(good[0], targets)
    with pytest.raises(ValueError, match="n_classes must be positive"):
        mean_average_precision(good, targets, n_classes=0)


# ---------------------------------------------------------------- the model


def test_sine_position_encoding_equals_hf():
    hf = DetrSinePositionEmbedding(8, normalize=True)
    ref = hf(torch.Size([1, 16, 3, 5]), "cpu", torch.float64)  # (1, 16, H, W)
    ours = sine_position_encoding(3, 5, 16).double()  # (H * W, 16)
    torch.testing.assert_close(ours, ref[0].flatten(1).T, atol=1e-6, rtol=0)


def _pair(seed: int = 0):
    """A tiny HF DETR with random weights and batch-norm statistics, and ours with
    the same weights, both float64 in eval mode."""
    torch.manual_seed(seed)
    backbone = ResNetConfig(
        num_channels=1,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 2],
        layer_type="basic",
        out_features=["stage2"],
    )
    config = DetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=backbone,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=24,
        decoder_ffn_dim=24,
        num_queries=6,
        num_labels=4,
    )
    hf = DetrForObjectDetection(config).double().eval()
    with torch.no_grad():  # frozen batch norms that do something
        for name, buffer in hf.named_buffers():
            if name.endswith(("running_var", "weight")):
                buffer.uniform_(0.5, 1.5)
            elif name.endswith(("running_mean", "bias")):
                buffer.normal_(0, 0.3)
    ours = DETR(
        DETRConfig(
            num_classes=4,
            stem_width=8,
            widths=(8, 16),
            depths=(1, 2),
            d_model=16,
            n_heads=2,
            encoder_layers=2,
            decoder_layers=2,
            d_ff=24,
            num_queries=6,
        )
    ).double()
    ours.load_state_dict(detr_from_hf_state_dict(hf.state_dict()))
    return hf, ours.eval()


def _targets(n_images: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    targets = []
    for m in (2, 3, 1)[:n_images]:
        centre = torch.rand(m, 2, generator=gen, dtype=torch.float64) * 0.6 + 0.2
        size = torch.rand(m, 2, generator=gen, dtype=torch.float64) * 0.3 + 0.1
        labels = torch.randint(0, 4, (m,), generator=gen)
        targets.append((labels, torch.cat([centre, size], 1)))
    return targets


def test_detr_equals_hf_with_copied_weights():
    hf, ours = _pair()
    images = torch.rand(2, 1, 64, 48, dtype=torch.float64)
    with torch.no_grad():
        reference = hf(pixel_values=images)
        logits, boxes = ours(images)
    assert logits.shape == (2, 6, 5) and boxes.shape == (2, 6, 4)
    torch.testing.assert_close(logits, reference.logits, **F64)
    torch.testing.assert_close(boxes, reference.pred_boxes, **F64)


def test_matching_and_set_loss_equal_hf():
    # HF's loss weighs the classes with a float32 tensor: compare in float32
    hf, ours = (model.float() for model in _pair(1))
    images = torch.rand(2, 1, 64, 64)
    targets = [(lab, box.float()) for lab, box in _targets()]
    labels = [{"class_labels": lab, "boxes": box} for lab, box in targets]
    reference = hf(pixel_values=images, labels=labels)
    logits, boxes = ours(images)
    matcher = HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
    ref_match = matcher({"logits": logits, "pred_boxes": boxes}, labels)
    for (rows, cols), (ref_rows, ref_cols) in zip(
        match(logits, boxes, targets), ref_match, strict=True
    ):
        assert rows.tolist() == ref_rows.tolist() and cols.tolist() == ref_cols.tolist()
    loss, parts = set_loss(logits, boxes, targets, LossWeights())
    F32 = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, reference.loss, **F32)
    for ours_name, hf_name in (
        ("ce", "loss_ce"),
        ("l1", "loss_bbox"),
        ("giou", "loss_giou"),
    ):
        torch.testing.assert_close(
            parts[ours_name], reference.loss_dict[hf_name], **F32
        )
    loss.backward()  # the matching is outside the graph; the loss has gradients
    assert ours.query_position_embeddings.weight.grad.abs().sum() > 0


def test_detect_equals_hf_post_processing():
    hf, ours = _pair(2)
    images = torch.rand(3, 1, 40, 56, dtype=torch.float64)
    with torch.no_grad():
        outputs = hf(pixel_values=images)
    sizes = torch.tensor([[40, 56]] * 3)
    processor = DetrImageProcessor()
    reference = processor.post_process_object_detection(
        outputs, threshold=0.2, target_sizes=sizes
    )
    for (boxes, scores, labels), ref in zip(
        detect(ours, images, score_threshold=0.2), reference, strict=True
    ):
        torch.testing.assert_close(boxes, ref["boxes"], **F64)
        torch.testing.assert_close(scores, ref["scores"], **F64)
        assert labels.tolist() == ref["labels"].tolist()
    everything = detect(ours, images)
    assert all(len(s) == 6 for _, s, _ in everything)  # every query by default


def _tiny_training_set():
    """Eight random images with one box each, and the sizes of a tiny DETR."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 32, 32, generator=gen)
    boxes = [np.array([[2.0, 3.0, 12.0, 20.0]], dtype=np.float32)] * 8
    labels = [np.array([i % 3]) for i in range(8)]
    sizes = dict(stem_width=4, widths=(8,), depths=(1,), d_model=8, n_heads=2, d_ff=8)
    sizes |= dict(encoder_layers=1, decoder_layers=1, num_queries=3)
    return images, boxes, labels, sizes


def test_train_detr_is_reproducible_and_returns_an_eval_model():
    images, boxes, labels, sizes = _tiny_training_set()
    a = train_detr(images, boxes, labels, steps=3, seed=1, batch_size=4, **sizes)
    b = train_detr(images, boxes, labels, steps=3, seed=1, batch_size=4, **sizes)
    assert not a.training and len(a.losses) == 3 and a.config.num_queries == 3
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=0, rtol=0)
    with pytest.raises(ValueError, match="one entry per image"):
        train_detr(images, boxes[:3], labels, steps=1, **sizes)
    with pytest.raises(ValueError, match="steps must be positive"):
        train_detr(images, boxes, labels, steps=0, **sizes)


def test_pretrain_backbone_places_digits_as_the_canvases_do():
    gen = torch.Generator().manual_seed(0)
    digits = torch.zeros(16, 28, 28)
    digits[:, 4:24, 10:18] = 1.0  # a bar: its scaled ink is a known box
    classes = torch.arange(16) % 4
    sizes = dict(stem_width=4, widths=(8,), depths=(1,))
    for _ in range(5):  # the heights of load_digit_boxes(size=40): 8 to 20 pixels
        x = _paste_at_one_scale(digits[:, None], 40, gen)
        assert x.shape == (16, 1, 20, 20)
        rows = torch.nonzero(x[0, 0].amax(1) > 0.5).flatten()
        side = 28 * (rows[-1] - rows[0] + 1) / 20  # the bar is 20 of 28 rows
        assert 8 - 2 <= side <= 20 + 2
    a = pretrain_backbone(digits, classes, steps=2, seed=3, size=40, **sizes)
    b = pretrain_backbone(digits, classes, steps=2, seed=3, size=40, **sizes)
    assert isinstance(a, Backbone) and not a.training and len(a.accuracies) == 2
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=0, rtol=0)
    with pytest.raises(ValueError, match="one entry per digit"):
        pretrain_backbone(digits, classes[:3], steps=1, **sizes)
    with pytest.raises(ValueError, match="digits must have 3 dimensions"):
        pretrain_backbone(digits[:, None], classes, steps=1, **sizes)
    with pytest.raises(ValueError, match="steps must be positive"):
        pretrain_backbone(digits, classes, steps=0, **sizes)


def test_train_detr_keeps_a_pretrained_backbone_frozen():
    images, boxes, labels, sizes = _tiny_training_set()
    backbone = Backbone(1, 4, (8,), (1,)).eval()
    with torch.no_grad():
        for name, buffer in backbone.named_buffers():  # batch norms that do something
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    untrained = DETR(DETRConfig(**sizes))
    model = train_detr(
        images, boxes, labels, steps=3, batch_size=4, backbone=backbone,
        schedule="constant", **sizes,
    )  # fmt: skip
    for key, value in backbone.state_dict().items():  # frozen: the weights given
        torch.testing.assert_close(model.backbone.state_dict()[key], value)
    moved = (
        model.bbox_predictor.layers[2].weight
        - untrained.bbox_predictor.layers[2].weight
    )
    assert moved.abs().max() > 0  # the rest trained
    with pytest.raises(TypeError, match="backbone must be a Backbone"):
        train_detr(images, boxes, labels, steps=1, backbone=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="schedule must be"):
        train_detr(images, boxes, labels, steps=1, schedule="step", **sizes)


def test_model_and_detect_reject_bad_input():
    with pytest.raises(ValueError, match="d_model must be divisible"):
        DETRConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="widths and depths"):
        DETRConfig(widths=(8, 16), depths=(1,))
    with pytest.raises(ValueError, match="num_queries must be positive"):
        DETRConfig(num_queries=0)
    with pytest.raises(TypeError, match="config must be a DETRConfig"):
        DETR({"d_model": 8})
    _, ours = _pair()
    with pytest.raises(ValueError, match="images must have 1 channels"):
        ours(torch.rand(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="images must have 4 dimensions"):
        detect(ours, torch.rand(32, 32, dtype=torch.float64))
    with pytest.raises(TypeError, match="model must be a DETR"):
        detect(torch.nn.Linear(2, 2), torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="score_threshold must be in"):
        detect(ours, torch.rand(1, 1, 32, 32, dtype=torch.float64), score_threshold=1)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        detr_from_hf_state_dict([1, 2])
