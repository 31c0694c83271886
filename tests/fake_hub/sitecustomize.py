"""Test shim: a Hub that copies uploaded folders under $FAKE_HUB (the GPU machines are offline)."""
import os
import shutil

import huggingface_hub


class FakeApi:
    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        return repo_id

    def upload_folder(self, folder_path, repo_id, **kwargs):
        dest = os.path.join(os.environ["FAKE_HUB"], repo_id.replace("/", "--"))
        shutil.copytree(folder_path, dest)  # fails if a second process uploads too
        with open(dest + ".rank", "w") as f:
            f.write(os.environ.get("RANK", "none"))


huggingface_hub.HfApi = FakeApi
