"""MLflow tracking helpers: flattened, redacted params and where the store is."""

from tunegraph.tracking import REDACTED, flatten_params, tracking_uri


def test_params_are_flattened_and_secrets_redacted():
    flat = flatten_params({"teacher": {"base_url": "http://x", "api_key": "sk-123", "auth_token": "t"},
                           "lora": {"r": 16, "target_modules": ["q_proj", "v_proj"]}, "password": "p",
                           "key": "k", "keyword": "fine", "lr": 0.1})
    assert flat["teacher.base_url"] == "http://x"
    assert flat["teacher.api_key"] == flat["teacher.auth_token"] == flat["password"] == flat["key"] == REDACTED
    assert flat["keyword"] == "fine"
    assert flat["lora.r"] == "16" and flat["lora.target_modules"] == "['q_proj', 'v_proj']"
    assert flat["lr"] == "0.1"
    assert "sk-123" not in str(flat)


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path, None) == f"sqlite:///{tmp_path.resolve()}/.tunegraph/mlflow.db"
    assert tracking_uri(tmp_path, "http://mlflow:5000") == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    assert tracking_uri(tmp_path, "http://mlflow:5000") == "sqlite:////elsewhere.db"
