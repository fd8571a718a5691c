"""The scoring of chapter 06's shipped LDMs (minildm.experiments.latent): caption and layout following read off
the pixels and by the shapes evaluator must accept real images of the asked scenes and reject wrong ones."""

import torch

from minildm import data
from minildm.experiments import latent as experiment


def test_real_images_follow_their_captions_and_other_images_do_not():
    scenes = experiment.requests(300)
    real = experiment.follow_scores(scenes.tensors()[0], scenes)
    assert real["kind"] > 0.97 and real["color"] > 0.97 and real["position"] > 0.9 and real["size"] > 0.95
    others = data.ShapesDataset(300, 32, seed=7)  # real shapes, but not the asked ones
    wrong = experiment.follow_scores(others.tensors()[0], scenes)
    assert wrong["kind"] < 0.35 and wrong["color"] < 0.3 and wrong["position"] < 0.3 and wrong["all"] < 0.02


def test_attributes_are_read_from_the_pixels():
    scenes = data.ShapesDataset(200, 32, seed=3)
    seen, asked = experiment.read_attributes(scenes.tensors()[0]), experiment.asked_attributes(scenes)
    assert (seen["size"] == asked["size"]).float().mean() > 0.97
    flipped = experiment.read_attributes(scenes.tensors()[0].flip(-1))  # mirrored: left and right swap
    column = asked["position"] % 3
    moved = column != 1
    assert ((flipped["position"] % 3)[moved] == (2 - column)[moved]).float().mean() > 0.9


def test_box_scores_reward_objects_in_their_boxes():
    scenes = experiment.requests(200, max_objects=3)
    real = experiment.box_scores(scenes.tensors()[0], scenes)
    assert real["iou"] > 0.5 and real["box_kind"] > 0.85 and real["empty_outside"] > 0.99
    elsewhere = experiment.box_scores(data.ShapesDataset(200, 32, seed=9, max_objects=3).tensors()[0], scenes)
    assert elsewhere["iou"] < 0.2 and elsewhere["empty_outside"] < 0.3
    blank = experiment.box_scores(torch.full((200, 3, 32, 32), -1.0), scenes)
    assert blank["iou"] == 0
