"""The front page stays a guide and every page's links lead somewhere: the README is at most 250
lines, each area in its methods table has a page, and every relative link of the pages resolves."""
import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGES = ["README.md", "experiments/README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(
    os.path.join(REPO, "research", "*", "README.md")))]


def test_the_readme_is_a_guide_and_links_every_area_page():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert len(readme.splitlines()) <= 250
    for page in PAGES[1:]:
        assert f"]({page})" in readme, page


def test_every_relative_link_of_the_pages_resolves():
    broken = []
    for page in PAGES:
        with open(os.path.join(REPO, page)) as f:
            for link in re.findall(r"\]\(([^)#]+)\)", f.read()):
                if not link.startswith("http") and not os.path.exists(os.path.join(REPO, os.path.dirname(page), link)):
                    broken.append((page, link))
    assert not broken
