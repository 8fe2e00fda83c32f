"""How a session on a source starts (clients.SOURCE_SESSION): after the URL's own options, which
a pooler or an operator may need (an endpoint id, a statement timeout), never instead of them."""

from __future__ import annotations

from audit_platform.clients import SOURCE_SESSION, source_options


def test_a_url_without_options_gets_the_source_session_alone():
    assert source_options("postgresql://capture@db/shop") == SOURCE_SESSION


def test_the_url_s_own_options_are_kept_and_the_search_path_comes_last():
    url = "postgresql://capture@db/shop?options=endpoint%3Dep-1%20-c%20statement_timeout%3D5s"
    options = source_options(url)
    assert options.startswith("endpoint=ep-1 -c statement_timeout=5s ")
    # A search path the URL sets is overridden: the later -c wins.
    sneaky = source_options("host=db dbname=shop options='-c search_path=public'")
    assert sneaky.index("search_path=public") < sneaky.index("search_path=pg_catalog,pg_temp")
