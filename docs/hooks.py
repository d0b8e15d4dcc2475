"""mkdocs hook: the home page is the repository's README, its links into docs/ made relative to the site."""
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def on_page_markdown(markdown, page, config, files):
    if page.file.src_path == "index.md":
        return README.read_text().replace("](docs/", "](")
    return markdown
