"""YOLO: the grid coding round-trips, the loss equals its terms written out, NMS equals
greedy NMS read literally (ties included), class-wise NMS equals a loop over classes."""

import math

import numpy as np
import pytest
import torch

from dlabc.vision.yolo import (
    YOLO,
    batched_nms,
    decode,
    detect,
    encode_targets,
    grid_detections,
    nms,
    nms_brute_force,
    train_yolo,
    yolo_loss,
)


def random_boxes(n, generator, size=64.0, quantum=None):
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * size
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * size / 3 + 1
    if quantum is not None:  # on a lattice: many boxes share an IoU
        xy = (xy / quantum).round() * quantum
        wh = ((wh / quantum).round() * quantum).clamp(min=quantum)
    return torch.cat([xy, xy + wh], dim=1)


def test_encode_then_decode_gives_back_every_box():
    g = torch.Generator().manual_seed(0)
    boxes, labels = [], []
    for _ in range(20):  # one box per cell at most: boxes that do not share a cell
        cells = torch.randperm(64, generator=g)[:3]
        centre = torch.stack([cells % 8, cells // 8], 1) * 8.0 + 0.5
        centre = centre + torch.rand(3, 2, generator=g) * 7
        size = torch.rand(3, 2, generator=g) * 30 + 2
        boxes.append(torch.cat([centre - size / 2, centre + size / 2], 1))
        labels.append(torch.randint(0, 10, (3,), generator=g))
    objectness, classes, coded = encode_targets(boxes, labels)
    decoded = decode(coded)
    for n in range(20):
        i, j = objectness[n].nonzero(as_tuple=True)
        assert len(i) == 3
        cx = (boxes[n][:, 0] + boxes[n][:, 2]) / 2
        cy = (boxes[n][:, 1] + boxes[n][:, 3]) / 2
        for k in range(3):  # the cell that holds the centre has the box and the class
            row, col = int(cy[k] // 8), int(cx[k] // 8)
            assert objectness[n, row, col] == 1
            assert classes[n, row, col] == labels[n][k]
            torch.testing.assert_close(
                decoded[n, row, col], boxes[n][k], atol=1e-4, rtol=0
            )
        assert 0 <= coded[n, i, j, :2].min() and coded[n, i, j, :2].max() < 1


def test_the_smaller_object_keeps_a_shared_cell():
    big = torch.tensor([[0.0, 0.0, 14.0, 14.0], [1.0, 1.0, 13.0, 13.0]])
    objectness, classes, coded = encode_targets([big], [torch.tensor([3, 7])])
    assert objectness.sum() == 1 and classes[0, 0, 0] == 7
    torch.testing.assert_close(decode(coded)[0, 0, 0], big[1])


def test_encode_accepts_the_data_format_and_checks_it():
    boxes = [np.array([[1, 2, 20, 30]], np.float32), np.zeros((0,), np.float32)]
    labels = [np.array([4]), np.zeros((0,), np.int64)]
    objectness, _, _ = encode_targets(boxes, labels)
    assert objectness.sum() == 1
    with pytest.raises(ValueError, match=r"boxes\[0\] must have shape"):
        encode_targets([torch.ones(2, 3)], [torch.ones(2, dtype=torch.long)])
    with pytest.raises(ValueError, match="x1 > x0"):
        encode_targets([torch.tensor([[5.0, 5, 1, 9]])], [torch.tensor([0])])
    with pytest.raises(ValueError, match="one entry per image"):
        encode_targets([torch.ones(1, 4)], [])
    with pytest.raises(TypeError, match="labels.* integer"):
        encode_targets([torch.tensor([[1.0, 1, 5, 5]])], [torch.tensor([0.5])])
    with pytest.raises(ValueError, match="grid_size must be positive"):
        encode_targets([], [], grid_size=0)


def test_decode_by_hand_and_its_checks():
    coded = torch.zeros(2, 2, 4, dtype=torch.float64)
    coded[1, 0] = torch.tensor([0.5, 0.25, 0.5, 0.25])  # row 1, column 0
    # centre ((0 + 0.5) 8, (1 + 0.25) 8) = (4, 10); size (0.25, 0.0625) * 16 = (4, 1)
    assert decode(coded)[1, 0].tolist() == [2.0, 9.5, 6.0, 10.5]
    with pytest.raises(ValueError, match=r"coded must have shape \(\.\.\., S, S, 4\)"):
        decode(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="coded must be a floating-point"):
        decode(torch.zeros(2, 2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="stride must be positive"):
        decode(coded, stride=0)


def test_the_model_has_the_grid_shapes_and_checks_images():
    torch.manual_seed(0)
    model = YOLO(n_classes=10, width=4).eval()
    objectness, class_logits, coded = model(torch.rand(2, 1, 48, 48))
    assert objectness.shape == (2, 6, 6) and class_logits.shape == (2, 6, 6, 10)
    assert coded.shape == (2, 6, 6, 4)
    # the objectness starts at the prior probability of an object, about 1 in 32
    assert abs(torch.sigmoid(objectness).mean().item() - 1 / 32) < 0.02
    with pytest.raises(ValueError, match="a multiple of 8"):
        model(torch.rand(2, 1, 60, 60))
    with pytest.raises(ValueError, match="images must be square"):
        model(torch.rand(2, 1, 64, 48))
    with pytest.raises(TypeError, match="floating"):
        model(torch.ones(2, 1, 64, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="width must be positive"):
        YOLO(width=0)


def test_the_loss_equals_its_terms_written_cell_by_cell():
    g = torch.Generator().manual_seed(1)
    N, S, K = 3, 4, 5
    objectness = torch.randn(N, S, S, generator=g, dtype=torch.float64)
    class_logits = torch.randn(N, S, S, K, generator=g, dtype=torch.float64)
    coded = torch.rand(N, S, S, 4, generator=g, dtype=torch.float64)
    responsible = (torch.rand(N, S, S, generator=g) < 0.3).double()
    classes = torch.randint(0, K, (N, S, S), generator=g)
    target = torch.rand(N, S, S, 4, generator=g, dtype=torch.float64)
    loss = yolo_loss(
        (objectness, class_logits, coded), (responsible, classes, target), 5.0, 0.5
    )
    expected = 0.0
    for n in range(N):
        for i in range(S):
            for j in range(S):
                p = 1 / (1 + math.exp(-objectness[n, i, j].item()))
                if responsible[n, i, j]:
                    se = ((coded[n, i, j] - target[n, i, j]) ** 2).sum().item()
                    log_softmax = class_logits[n, i, j].log_softmax(-1)
                    ce = -log_softmax[classes[n, i, j]].item()
                    expected += 5.0 * se + ce - math.log(p)
                else:
                    expected += -0.5 * math.log(1 - p)
    assert loss.item() == pytest.approx(expected / N, rel=1e-12)


@pytest.mark.parametrize("quantum", [None, 4.0])
def test_nms_equals_greedy_nms_read_literally(quantum):
    g = torch.Generator().manual_seed(2)
    for trial in range(30):
        n = int(torch.randint(0, 40, (1,), generator=g))
        boxes = random_boxes(n, g, quantum=quantum)  # quantum: many equal IoUs
        scores = torch.randint(0, 5, (n,), generator=g).double()  # many ties
        threshold = [0.0, 0.3, 0.5, 0.7, 1.0][trial % 5]
        assert nms(boxes, scores, threshold).tolist() == nms_brute_force(
            boxes, scores, threshold
        )


def test_nms_by_hand_and_its_checks():
    boxes = torch.tensor(
        [[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]]
    )
    scores = torch.tensor([0.9, 0.95, 0.5, 0.9])
    # IoU(0, 1) = 81 / 119 = 0.68: box 1 beats 0 and 3 (tied with 0, same box)
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.7).tolist() == [1, 0, 2]
    assert nms(boxes, scores, 1.0).tolist() == [1, 0, 3, 2]
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    with pytest.raises(ValueError, match=r"boxes must have shape \(n, 4\)"):
        nms(boxes[:, :3], scores, 0.5)
    with pytest.raises(ValueError, match="iou_threshold must be in"):
        nms(boxes, scores, 1.5)
    with pytest.raises(ValueError, match=r"labels must have shape"):
        batched_nms(boxes, scores, torch.zeros(3, dtype=torch.long), 0.5)


def test_batched_nms_equals_nms_class_by_class():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        n = int(torch.randint(1, 40, (1,), generator=g))
        boxes = random_boxes(n, g, size=32.0)
        scores = torch.rand(n, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 3, (n,), generator=g)
        expected = []
        for c in range(3):
            mine = torch.nonzero(labels == c)[:, 0]
            expected += mine[nms_brute_force(boxes[mine], scores[mine], 0.4)].tolist()
        got = batched_nms(boxes, scores, labels, 0.4).tolist()
        assert sorted(got) == sorted(expected)
        assert got == sorted(got, key=lambda k: -scores[k].item())


def test_detect_returns_the_grid_above_the_threshold_after_nms():
    torch.manual_seed(4)
    model = YOLO(width=4)
    images = torch.rand(2, 1, 32, 32)
    boxes, scores, labels = grid_detections(model.eval(), images)
    assert boxes.shape == (2, 16, 4) and scores.shape == labels.shape == (2, 16)
    raw = detect(model, images, score_threshold=0.0, iou_threshold=None)
    final = detect(model, images, score_threshold=0.0, iou_threshold=0.3)
    for n in range(2):
        torch.testing.assert_close(raw[n][1], scores[n])
        keep = batched_nms(boxes[n], scores[n], labels[n], 0.3)
        torch.testing.assert_close(final[n][0], boxes[n][keep])
    with pytest.raises(TypeError, match="model must be a YOLO"):
        detect(torch.nn.Linear(2, 2), images)
    with pytest.raises(ValueError, match="score_threshold must be in"):
        detect(model, images, score_threshold=-0.1)


def test_a_few_training_steps_lower_the_loss_and_check_arguments():
    g = torch.Generator().manual_seed(5)
    images = torch.zeros(16, 1, 32, 32)
    boxes, labels = [], []
    for n in range(16):  # one bright square per image; its class is its quadrant
        x, y = (int(v) for v in torch.randint(0, 24, (2,), generator=g))
        images[n, 0, y : y + 8, x : x + 8] = 1.0
        boxes.append(torch.tensor([[x, y, x + 8.0, y + 8.0]]))
        labels.append(torch.tensor([2 * (y >= 12) + (x >= 12)]))
    targets = encode_targets(boxes, labels, grid_size=4)
    torch.manual_seed(0)
    before = yolo_loss(YOLO(width=4).eval()(images), targets).item()
    model = train_yolo(images, boxes, labels, steps=60, batch_size=16, lr=1e-2, width=4)
    assert not model.training
    after = yolo_loss(model(images), targets).item()
    assert after < 0.5 * before
    with pytest.raises(ValueError, match="steps must be positive"):
        train_yolo(images, boxes, labels, steps=0)
    with pytest.raises(ValueError, match="one entry per image"):
        train_yolo(images, boxes[:3], labels[:3], steps=1)
    with pytest.raises(ValueError, match="images must be square"):
        train_yolo(images[..., :24], boxes, labels, steps=1)


def test_the_loss_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(6)
    outputs = [
        torch.randn(1, 2, 2, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(1, 2, 2, 3, generator=g, dtype=torch.float64, requires_grad=True),
        torch.rand(1, 2, 2, 4, generator=g, dtype=torch.float64, requires_grad=True),
    ]
    targets = (
        torch.tensor([[[1.0, 0], [0, 1]]], dtype=torch.float64),
        torch.tensor([[[2, 0], [0, 1]]]),
        torch.rand(1, 2, 2, 4, generator=g, dtype=torch.float64),
    )
    assert torch.autograd.gradcheck(
        lambda *o: yolo_loss(tuple(o), targets), tuple(outputs)
    )
