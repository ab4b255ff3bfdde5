"""The generator as an MLflow pyfunc model, logged as a *model from code*.

MLflow copies this file (and the `components` package, via code_paths) into the model, so
the model loads anywhere `tinyldm`'s dependencies are installed; nothing is pickled.
Input: a DataFrame with a string column `prompt`; params seed, steps, guidance, width,
height, text_box ("x,y,w,h" in units of the side: where the quoted text goes), typeset
(draw the quoted text crisply over the output); defaults live in the logged signature.
Output: a column `image` holding each PNG as base64 text, which is what survives JSON
serving.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext


def png_b64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class GeneratorModel(PythonModel):
    limits: Any = None  # params.serve when `tinyldm serve` serves it: per-request limits

    def load_context(self, context: PythonModelContext) -> None:
        from components.config import Sampler
        from components.contracts import UserError
        from components.models.generator import Generator

        # model_config carries params.sampler as it was when the model was logged
        sampler = (context.model_config or {}).get("sampler")
        if not sampler:
            raise UserError("this model was logged without its sampler settings (model_config "
                            "'sampler'); register it again with `tinyldm stage register`")
        up = context.artifacts.get("upscaler")  # a model logged before it had none
        self.generator = Generator.load(Path(context.artifacts["vae"]),
                                        Path(context.artifacts["unet"]),
                                        Sampler(**sampler), upscaler_dir=up and Path(up))

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from components.contracts import UserError
        from components.models.generator import check_size
        from components.models.layout import parse_box
        from components.ship.limits import check_limits

        p = params or {}
        prompts = [str(x) for x in model_input["prompt"].tolist()]
        width = int(p["width"]) if p.get("width") is not None else None
        height = int(p["height"]) if p.get("height") is not None else None
        seed = int(p.get("seed", 0))
        steps = int(p["steps"]) if p.get("steps") is not None else None
        try:  # a bad request is the caller's to fix: HTTP 400 with the one-line reason
            if self.limits is not None:
                check_limits(len(prompts), steps, self.limits)
            check_size(width, height)
            self.generator.check_prompts(prompts)
            box = parse_box(str(p["text_box"])) if p.get("text_box") else None
            layouts = self.generator.text_layouts(prompts, seed, box)
        except UserError as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
        images = self.generator.generate(
            prompts,
            seed=seed,
            steps=steps,
            guidance=float(p["guidance"]) if p.get("guidance") is not None else None,
            width=width, height=height, typeset=bool(p.get("typeset", False)),
            layouts=layouts,
        )
        # and each prompt as the U-Net read it (sampler.normalise), so a caller sees a rewrite
        return pd.DataFrame({"image": [png_b64(im) for im in images],
                             "prompt_read": self.generator.read_prompts(prompts)})


mlflow.models.set_model(GeneratorModel())
