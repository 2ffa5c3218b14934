"""`make report`: the benchmark results on disk (plain files beside each offline W&B run) turned into one
self-contained HTML report and a markdown summary, set against the paper's numbers.

    python -m pipeline.report [--runs runs] [--out reports/report.html] [--strict] [--publish]

    sources.py        find the result files under --runs and read them into checked records (and their W&B runs)
    headline.py       the paper's ratios next to the measured ones, each with the file and setting it came from
    plots.py          the figures (matplotlib, PNG bytes)
    sections.py       the report's content per experiment, as blocks both renderers know
    html_page.py      the HTML page (figures inlined as base64 data URIs: one file, nothing fetched)
    markdown_page.py  the markdown summary
    context.py        git revision, date, machine
    publish.py        optional: the same content as a W&B Report, when a server and credentials are there
"""
