"""A GCS API on 127.0.0.1 for the tests: `python tests/gcs_emulator.py PORT BUCKET`.

gcp-storage-emulator (in memory, with BUCKET created), plus the response headers it leaves
out of media downloads that real GCS sends: `x-goog-generation` and
`x-goog-metageneration`. tensorstore reads an object's generation from them; without
them the generation of orbax's OCDBT manifest reads back malformed and every save after
the first object fails ("Malformed StorageGeneration").
"""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])
  except Exception:  # noqa: BLE001  a missing object: the download itself answers 404
    pass
  return _download(request, response, storage, *args, **kwargs)


objects.download = _download_with_generation  # before the server builds its routes

from gcp_storage_emulator.server import create_server  # noqa: E402


def main() -> None:
  port, bucket = int(sys.argv[1]), sys.argv[2]
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.run()  # until the test terminates this process


if __name__ == "__main__":
  main()
