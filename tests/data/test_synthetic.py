import numpy as np
import pytest

from captcha_lit.charset import Charset
from captcha_lit.data.synthetic import CaptchaGenerator, GeneratorSpec, generate
from conftest import synthetic_data

SPEC = GeneratorSpec(charset="0-9A-Z", min_length=5, max_length=5, input_size=(32, 96))


def test_output_shape_and_dtype():
    texts, images = generate(SPEC, seed=0, split="train", count=6, workers=1)
    assert len(texts) == 6
    assert images.shape == (6, 32, 96, 3)
    assert images.dtype == np.uint8
    assert all(len(t) == 5 for t in texts)
    # real drawings, not blank canvases
    assert all(images[i].std() > 5 for i in range(6))


def test_same_seed_is_byte_identical_across_calls():
    texts_a, images_a = generate(SPEC, seed=7, split="train", count=8, workers=1)
    texts_b, images_b = generate(SPEC, seed=7, split="train", count=8, workers=1)
    assert texts_a == texts_b
    assert images_a.tobytes() == images_b.tobytes()


def test_same_seed_is_byte_identical_across_worker_counts():
    # chunk_size=3 splits 8 images into 3 chunks, so workers=2 really uses a process pool.
    texts_1, images_1 = generate(SPEC, seed=3, split="val", count=8, workers=1, chunk_size=3)
    texts_2, images_2 = generate(SPEC, seed=3, split="val", count=8, workers=2, chunk_size=3)
    assert texts_1 == texts_2
    assert images_1.tobytes() == images_2.tobytes()


def test_image_depends_only_on_its_index():
    # The first 4 of 8 images equal 4 images generated alone, whatever the chunking.
    texts_8, images_8 = generate(SPEC, seed=5, split="train", count=8, workers=1, chunk_size=3)
    texts_4, images_4 = generate(SPEC, seed=5, split="train", count=4, workers=1)
    assert texts_8[:4] == texts_4
    assert np.array_equal(images_8[:4], images_4)


def test_fills_preallocated_output():
    out = np.zeros((4, 32, 96, 3), dtype=np.uint8)
    texts, images = generate(SPEC, seed=0, split="train", count=4, workers=1, out=out)
    assert images is out
    assert out.any()


@pytest.mark.parametrize(("a", "b"), [((0, "train"), (1, "train")), ((0, "train"), (0, "val")),
                                      ((0, "val"), (0, "test"))])
def test_different_seed_or_split_gives_different_images(a, b):
    texts_a, images_a = generate(SPEC, seed=a[0], split=a[1], count=4, workers=1)
    texts_b, images_b = generate(SPEC, seed=b[0], split=b[1], count=4, workers=1)
    assert texts_a != texts_b
    for i in range(4):
        assert not np.array_equal(images_a[i], images_b[i])


def test_images_within_a_split_differ():
    texts, images = generate(SPEC, seed=0, split="train", count=4, workers=1)
    assert len(set(texts)) == 4
    assert not np.array_equal(images[0], images[1])


def test_variable_length_in_range():
    spec = GeneratorSpec(charset="0-9", min_length=4, max_length=7, input_size=(32, 96))
    texts, images = generate(spec, seed=1, split="train", count=48, workers=1)
    lengths = {len(t) for t in texts}
    assert lengths <= {4, 5, 6, 7}
    assert len(lengths) >= 3  # genuinely variable, not stuck at one length
    assert images.shape == (48, 32, 96, 3)


@pytest.mark.parametrize("charset", ["0-9", "a-z", "XYZ7"])
def test_labels_only_use_charset(charset):
    spec = GeneratorSpec(charset=charset, min_length=3, max_length=6, input_size=(32, 96))
    texts, _ = generate(spec, seed=0, split="train", count=24, workers=1)
    allowed = set(Charset(charset).chars)
    assert all(set(t) <= allowed for t in texts)
    assert all(3 <= len(t) <= 6 for t in texts)


def test_generator_sample_is_deterministic():
    gen = CaptchaGenerator(SPEC)
    text_a, image_a = gen.sample(11, "test", 3)
    text_b, image_b = gen.sample(11, "test", 3)
    assert text_a == text_b
    assert np.array_equal(image_a, image_b)
    assert image_a.shape == (32, 96, 3)


def test_secrets_module_is_restored_after_generation():
    import secrets

    import captcha.image

    generate(SPEC, seed=0, split="train", count=1, workers=1)
    assert captcha.image.secrets is secrets


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_length": 0, "max_length": 5}, "at least 1"),
        ({"min_length": -2, "max_length": 5}, "at least 1"),
        ({"min_length": 6, "max_length": 4}, "max_length=4 is less than data.min_length=6"),
        ({"width": 4, "height": 60}, "too small"),
        ({"charset": "AAB"}, "duplicate"),
        ({"charset": ""}, "empty"),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GeneratorSpec(**kwargs)


def test_spec_key_fields_distinguish_specs():
    a = GeneratorSpec(charset="0-9", input_size=(32, 96)).key_fields()
    b = GeneratorSpec(charset="0-9", input_size=(32, 128)).key_fields()
    assert a != b
    # a preset name and its literal characters are the same data
    assert GeneratorSpec(charset="0-9").key_fields() == GeneratorSpec(charset="0123456789").key_fields()


def test_char_weights_shape_the_drawn_texts():
    only_a_and_b = GeneratorSpec(charset="ABC", min_length=6, max_length=6, input_size=(32, 96),
                                 char_weights=(1.0, 1.0, 0.0))
    texts, _ = generate(only_a_and_b, seed=0, split="train", count=8, workers=1)
    assert all(set(t) <= {"A", "B"} for t in texts) and {"A", "B"} <= set("".join(texts))
    # Weighted specs get their own cache key.
    assert only_a_and_b.key_fields() != GeneratorSpec(charset="ABC", min_length=6, max_length=6,
                                                      input_size=(32, 96)).key_fields()
    for bad in ((1.0, 1.0), (1.0, -1.0, 1.0), (0.0, 0.0, 0.0)):
        with pytest.raises(ValueError, match="one non-negative weight per character"):
            GeneratorSpec(charset="ABC", char_weights=bad)


def test_train_char_weights_apply_to_the_train_split_only(tmp_path):
    from captcha_lit.data.datamodule import CaptchaDataModule

    dm = CaptchaDataModule(**synthetic_data(charset="0-9", input_size=(32, 96), num_train=40, num_val=40, num_test=8,
                                            train_char_weights={"7": 1000, 0: 0}, cache_dir=str(tmp_path), gen_workers=1))
    dm.prepare_data()
    dm.setup("fit")
    train, val = "".join(dm.datasets["train"].texts), "".join(dm.datasets["val"].texts)
    assert train.count("7") > 0.9 * len(train) and "0" not in train
    assert val.count("7") < 0.5 * len(val)  # val (and test) stay uniform
    # Characters outside the charset are skipped (the default weights name O, which 0-9 lacks).
    skipped = CaptchaDataModule(**synthetic_data(charset="0-9", train_char_weights={"O": 3, "0": 3}))
    assert skipped.split_specs["train"].char_weights == (3.0,) + (1.0,) * 9
    assert CaptchaDataModule(**synthetic_data(charset="0-9", train_char_weights={"O": 3})
                             ).split_specs["train"].char_weights is None
    with pytest.raises(ValueError, match="non-negative"):
        CaptchaDataModule(**synthetic_data(charset="0-9", train_char_weights={"1": -1}))
