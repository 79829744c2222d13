"""The distribution's metadata agree with each other: one version (the package's) in the citation
file and the changelog, the licence file the metadata names, and a name that is not `research`
(PyPI's `research` is another project)."""
import os
import tomllib

import research

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read(name: str) -> str:
    with open(os.path.join(REPO, name)) as f:
        return f.read()


def test_one_version_in_the_package_the_citation_and_the_changelog():
    project = tomllib.loads(read("pyproject.toml"))
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "research.__version__"}
    assert f"\nversion: {research.__version__}\n" in read("CITATION.cff")
    assert f"\n## {research.__version__} (" in read("CHANGELOG.md")


def test_the_licence_named_in_the_metadata_is_the_file_shipped():
    project = tomllib.loads(read("pyproject.toml"))["project"]
    assert project["name"] == "research-line"
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License" in read("LICENSE") and "Version 2.0, January 2004" in read("LICENSE")
    assert "\nlicense: Apache-2.0\n" in read("CITATION.cff")
