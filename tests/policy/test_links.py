"""The intrusive doubly linked lists every eviction policy keeps its order in."""

from __future__ import annotations

from tiercache.policy.links import Link, Links


def keys(links: Links[Link]) -> list[bytes]:
    return list(links)


def filled(*names: bytes) -> tuple[Links[Link], dict[bytes, Link]]:
    links: Links[Link] = Links()
    by_key = {n: Link(n) for n in names}
    for link in by_key.values():
        links.push(link)
    return links, by_key


def test_an_empty_list_has_no_first_and_no_members() -> None:
    links: Links[Link] = Links()
    assert links.first() is None
    assert len(links) == 0
    assert keys(links) == []


def test_push_appends_at_the_back_and_push_front_at_the_front() -> None:
    links, by_key = filled(b"a", b"b")
    links.push_front(Link(b"z"))
    assert keys(links) == [b"z", b"a", b"b"]
    assert len(links) == 3
    first = links.first()
    assert first is not None and first.key == b"z"
    assert links.after(by_key[b"b"]) is None
    after_a = links.after(by_key[b"a"])
    assert after_a is not None and after_a.key == b"b"


def test_insert_before_a_member_and_before_the_sentinel() -> None:
    links, by_key = filled(b"a", b"c")
    links.insert_before(Link(b"b"), by_key[b"c"])
    assert keys(links) == [b"a", b"b", b"c"]


def test_unlink_drops_a_member_from_anywhere_and_counts() -> None:
    links, by_key = filled(b"a", b"b", b"c")
    links.unlink(by_key[b"b"])
    assert keys(links) == [b"a", b"c"]
    assert len(links) == 2
    assert by_key[b"b"].owner is None
    links.unlink(by_key[b"a"])
    links.unlink(by_key[b"c"])
    assert links.first() is None and len(links) == 0


def test_a_link_moved_to_the_back_is_unlinked_then_pushed() -> None:
    links, by_key = filled(b"a", b"b", b"c")
    links.unlink(by_key[b"a"])
    links.push(by_key[b"a"])
    assert keys(links) == [b"b", b"c", b"a"]
    assert len(links) == 3


def test_a_walk_survives_unlinking_the_link_it_just_gave() -> None:
    links, _ = filled(b"a", b"b", b"c", b"d")
    seen = []
    for link in links.walk():
        seen.append(link.key)
        links.unlink(link)
    assert seen == [b"a", b"b", b"c", b"d"]
    assert len(links) == 0


def test_a_walk_skips_links_unlinked_ahead_of_it_and_sees_links_pushed_behind() -> None:
    links, by_key = filled(b"a", b"b", b"c")
    walk = links.walk()
    assert next(walk).key == b"a"
    links.unlink(by_key[b"b"])
    links.push(Link(b"d"))
    assert [link.key for link in walk] == [b"c", b"d"]


def test_resume_from_a_link_moved_into_another_list_ends_the_walk() -> None:
    mine, by_key = filled(b"a", b"b")
    other: Links[Link] = Links()
    mine.unlink(by_key[b"a"])
    other.push(by_key[b"a"])
    assert mine.resume(by_key[b"a"]) is None
    resumed = other.resume(by_key[b"a"])
    assert resumed is by_key[b"a"]


def test_resume_from_an_unlinked_link_finds_the_next_member() -> None:
    links, by_key = filled(b"a", b"b", b"c")
    links.unlink(by_key[b"a"])
    links.unlink(by_key[b"b"])
    assert links.resume(by_key[b"a"]) is by_key[b"c"]
    links.unlink(by_key[b"c"])
    assert links.resume(by_key[b"a"]) is None
