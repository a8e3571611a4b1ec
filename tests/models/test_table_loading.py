"""`fraud.load_table`: what a `deepserve build --data` table becomes, and what it refuses."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from deepserve.models import fraud


def _csv(tmp_path, text, name="t.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_float32_values_shape_and_named_label(tmp_path):
    path = _csv(tmp_path, "a, b ,flag,c\n1,2.5,0,-3\n4e2,0.1,2,6\n\n7,8,-1,9\n")
    table = fraud.load_table(path, "flag")
    assert table.x.dtype == np.float32 and table.x.shape == (3, 3)  # the blank line is skipped
    np.testing.assert_array_equal(table.x, np.array([[1, 2.5, -3], [400, 0.1, 6], [7, 8, 9]], np.float32))
    assert table.columns == ["a", "b", "c"]  # the label's column is left out, names stripped
    # Nonzero is anomalous, whatever its sign or size.
    assert table.label.dtype == np.int64 and table.label.tolist() == [0, 1, 1]
    assert table.schema == "generic" and table.source == str(path)


def test_label_found_by_name_or_absent(tmp_path):
    found = fraud.load_table(_csv(tmp_path, "x,Class\n1,0\n2,1e-50\n"))  # a tiny label is still nonzero
    assert found.columns == ["x"] and found.label.tolist() == [0, 1]
    unlabelled = fraud.load_table(_csv(tmp_path, "x,y\r\n1,2\r\n3,4\r\n", "u.csv"))
    assert unlabelled.label is None and unlabelled.x.tolist() == [[1, 2], [3, 4]]


def test_transaction_schema_round_trip_through_write_csv(tmp_path):
    x, label, _ = fraud.generate_transactions(3, fraud.SyntheticConfig(n_rows=2_000))
    path = tmp_path / "transactions.csv"
    fraud.write_csv(path, x[:1_500], label[:1_500])
    fraud.write_csv(path, x[1_500:], label[1_500:], append=True)
    table = fraud.load_table(path)
    assert table.schema == "transactions" and table.columns == fraud.TRANSACTION_COLUMNS
    assert table.x.shape == (2_000, 30) and table.label.tolist() == label.tolist()
    np.testing.assert_allclose(table.x, x, rtol=1e-5)  # 6 significant digits in the file


@pytest.mark.parametrize(("text", "message"), [
    ("a,b,label\n1,2,0\n3,oops,1\n", "every value must be numeric (column 'b': invalid value 'oops')"),
    ("a,b,label\n1,2,0\n3,,1\n", "missing value in column 'b', data row 2"),
    ("a,b,label\n1,nan,0\n", "contains NaN or infinite values (column 'b', data row 1)"),
    ("a,b,label\n1,2,0\n3,4,-inf\n", "contains NaN or infinite values (column 'label', data row 2)"),
    ("a,b,label\n1,2\n", "malformed CSV"),
    ("a,b,label\n", "needs a header row and at least one data row"),
    ("", "needs a header row and at least one data row"),
])
def test_bad_tables_are_named_errors(tmp_path, text, message):
    path = _csv(tmp_path, text, "bad.csv")
    with pytest.raises(ValueError) as caught:
        fraud.load_table(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)


def test_missing_label_column(tmp_path):
    path = _csv(tmp_path, "a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"label column 'Class' not in header \['a', 'b'\]"):
        fraud.load_table(path, "Class")


def test_too_few_normal_rows_is_a_clear_cli_error(tmp_path):
    path = _csv(tmp_path, "a,b,label\n" + "1,2,0\n" * 9 + "5,5,1\n" * 20)
    done = subprocess.run(
        [sys.executable, "-m", "deepserve.cli", "build", "--only", "fraud-autoencoder",
         "--data", str(path), "--repo", str(tmp_path / "r")],
        capture_output=True, text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{path}: 9 normal (label 0) row(s)" in done.stderr and "at least 10" in done.stderr


def test_scoring_in_batches_matches_one_pass():
    x, _, _ = fraud.generate_transactions(0, fraud.SyntheticConfig(n_rows=1_000))
    x = x.astype(np.float32)
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = fraud.FraudAutoencoder(fraud.feature_transforms(fraud.TRANSACTION_COLUMNS, "transactions"),
                                   fraud.AutoencoderConfig()).eval()
    rows = np.arange(0, 1_000, 3)[::-1]
    with torch.no_grad():
        whole = model(torch.from_numpy(x[rows]))[0].numpy()
    np.testing.assert_allclose(fraud.score(model, x, rows, batch_rows=64), whole, rtol=1e-6)
    np.testing.assert_allclose(fraud.score(model, x[rows]), whole, rtol=1e-6)
