"""KerasHub's own model test harness (`keras_hub.src.tests.test_case`), run
on our classes: the checks every KerasHub backbone, task and preprocessor is
held to, in addition to ours.

The harness is not public API (`src`); it needs TensorFlow and `grain` on
every backend. It skips mixed precision on torch without CUDA and
quantization on torch by itself.
"""

import numpy as np
import pytest

pytest.importorskip("grain", reason="KerasHub's TestCase imports grain")

from keras_hub.src.tests.test_case import TestCase  # noqa: E402

from keras_recurrentgemma import RecurrentGemmaBackbone  # noqa: E402
from keras_recurrentgemma import RecurrentGemmaCausalLM  # noqa: E402
from keras_recurrentgemma import RecurrentGemmaCausalLMPreprocessor  # noqa: E402
from tests.conftest import TINY_CONFIGS  # noqa: E402
from tests.models import tiny_tokenizer  # noqa: E402

TEXT = ["the quick brown fox", "the earth is round"]


class RecurrentGemmaHarnessTest(TestCase):
    def setUp(self):
        self.tokenizer = tiny_tokenizer()
        self.backbone_kwargs = {
            **TINY_CONFIGS["griffin"],
            "vocabulary_size": self.tokenizer.vocabulary_size(),
        }
        self.input_data = {
            "token_ids": np.array([[2, 17, 42, 7, 9], [2, 5, 8, 0, 0]], "int32"),
            "padding_mask": np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], "int32"),
        }
        self.preprocessor = RecurrentGemmaCausalLMPreprocessor(
            self.tokenizer, sequence_length=8
        )

    def test_backbone(self):
        hidden_dim = self.backbone_kwargs["hidden_dim"]
        self.run_backbone_test(
            cls=RecurrentGemmaBackbone,
            init_kwargs=self.backbone_kwargs,
            input_data=self.input_data,
            expected_output_shape=(2, 5, hidden_dim),
        )

    def test_backbone_with_segment_pos(self):
        # Packed rows: two documents in the first row.
        data = {
            **self.input_data,
            "segment_pos": np.array([[0, 1, 0, 1, 2], [0, 1, 2, 0, 0]], "int32"),
        }
        self.run_backbone_test(
            cls=RecurrentGemmaBackbone,
            init_kwargs=self.backbone_kwargs,
            input_data=data,
            expected_output_shape=(2, 5, self.backbone_kwargs["hidden_dim"]),
            run_quantization_check=False,  # same layers as `test_backbone`
        )

    def test_backbone_saving(self):
        self.run_model_saving_test(
            cls=RecurrentGemmaBackbone,
            init_kwargs=self.backbone_kwargs,
            input_data=self.input_data,
        )

    def test_causal_lm_task(self):
        backbone = RecurrentGemmaBackbone(**self.backbone_kwargs)
        self.run_task_test(
            cls=RecurrentGemmaCausalLM,
            init_kwargs={"backbone": backbone, "preprocessor": self.preprocessor},
            train_data=(TEXT,),
            expected_output_shape=(2, 8, self.backbone_kwargs["vocabulary_size"]),
        )

    def test_preprocessor(self):
        # `run_preprocessor_test` reads `self.init_kwargs`, as KerasHub's own
        # tests set it.
        self.init_kwargs = {"tokenizer": self.tokenizer, "sequence_length": 8}
        self.run_preprocessor_test(
            cls=RecurrentGemmaCausalLMPreprocessor,
            init_kwargs=self.init_kwargs,
            input_data=TEXT,
        )
