"""The release stage: ONNX export and parity gate (onnx), models store (publish), MLflow (registry), the stage that ties them (stage), predict."""
