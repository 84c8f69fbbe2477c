"""``run_beam.py`` reading from and writing to an object store, through Beam's S3 file system
against a local S3 server (moto's): the listing, ranged reads and writes that a gs:// or s3://
corpus goes through on Dataflow, and the file-system flags applied before the pipeline exists."""

import bz2
import hashlib
import os

import pytest

from .conftest import AUSTEN
from .test_run_beam_e2e import run_beam, shard_digests

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def s3():
    """A local S3 server; yields (its URL, a boto3 client)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
    yield url, client
    server.stop()


def write_corpus(root, text):
    """Three novels' worth of files in subfolders, compressed and not, beside what is no input."""
    paragraphs = text.split("\n\n")
    third = len(paragraphs) // 3
    files = {
        "emma/part-1.txt": "\n\n".join(paragraphs[:third]).encode(),
        "emma/part-2.txt.bz2": bz2.compress("\n\n".join(paragraphs[third:2 * third]).encode()),
        "persuasion.txt": "\n\n".join(paragraphs[2 * third:]).encode(),
        "README.md": b"# not a corpus file\n",
        ".cache/stale.txt": b"a hidden folder's file, not read\n",
    }
    for name, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    return files


def test_a_corpus_in_an_object_store_gives_the_shards_of_the_same_corpus_on_disk(s3, tmp_path):
    url, client = s3
    with bz2.open(AUSTEN, "rt", encoding="utf-8") as f:
        text = f.read(300_000)
    files = write_corpus(tmp_path / "books", text)
    client.create_bucket(Bucket="corpus")
    for name, data in files.items():
        client.put_object(Bucket="corpus", Key=f"books/{name}", Body=data)
    client.put_object(Bucket="corpus", Key="books/emma/", Body=b"")  # a console's "folder"
    s3_flags = [f"--s3_endpoint_url={url}", "--s3_access_key_id=test", "--s3_secret_access_key=test",
                "--s3_region_name=us-east-1"]
    common = ["--vocab-size", "2000", "--dupe-factor", "1", "--num-shards", "2", "--no-mlflow"]

    local = run_beam(["--input", str(tmp_path / "books"), "--output", str(tmp_path / "local"), *common])
    remote = run_beam(["--input", "s3://corpus/books/", "--output", str(tmp_path / "remote"), *common, *s3_flags])
    # Beam lists a remote folder one level deep: emma/ was left out before.
    for proc in (local, remote):
        assert "3 input file(s)" in proc.stderr and "1 file(s) of no input format skipped: README.md" in proc.stderr
    assert shard_digests(str(tmp_path / "remote")) == shard_digests(str(tmp_path / "local"))

    # The data dir written to the store too: the same shards, and the manifest last.
    run_beam(["--input", "s3://corpus/books/", "--output", "s3://corpus/data", *common, *s3_flags])
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="corpus", Prefix="data/")["Contents"]}
    assert "data/manifest.json" in keys and "data/tokenizer/spm.model" in keys
    written = {key.rsplit("/", 1)[1]: hashlib.sha256(client.get_object(Bucket="corpus", Key=key)["Body"].read())
               .hexdigest() for key in keys if key.startswith("data/shards/")}
    assert written == shard_digests(str(tmp_path / "local"))
    # The part files are deleted once the shards are written; a folder is no object in a store, so
    # deleting "data/parts" deleted nothing, and every part stayed (the size of the shards again).
    assert not [key for key in keys if key.startswith("data/parts/") or key.endswith(".inprogress")]


def test_hidden_files_and_folder_markers_are_left_out_of_a_remote_folder_glob(s3):
    """Hidden parts are judged below the folder the listing starts in, not by the pattern's length."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from preprocessing import inputs

    url, client = s3
    client.create_bucket(Bucket="globbed")
    for key in ("langs/en.v2/a.txt", "langs/.git/x.txt", "langs/fr/", "langs/fr/b.txt", "langs/fr/.draft.txt"):
        client.put_object(Bucket="globbed", Key=key, Body=b"" if key.endswith("/") else b"Some text here.\n")
    FileSystems.set_options(PipelineOptions([f"--s3_endpoint_url={url}", "--s3_access_key_id=test",
                                             "--s3_secret_access_key=test", "--s3_region_name=us-east-1"]))
    for pattern in ("s3://globbed/langs/", "s3://globbed/lan*/"):
        tasks = inputs.plan_read_tasks([pattern], 1 << 20)
        assert sorted(t.path for t in tasks) == ["s3://globbed/langs/en.v2/a.txt", "s3://globbed/langs/fr/b.txt"]
