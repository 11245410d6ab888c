"""Per-user chat data as per-user files: every chat participant is a user who learns to reply their way.

The input is a JSON file of conversations in the layout of the chitchat dataset
(``pip install chitchat-dataset``, ``chitchat_dataset/dataset.json``, MIT: real
open-domain chats between paid participants)::

    {"<conversation id>": {"messages": [[{"text": ..., "sender": ..., "timestamp": ...}, ...], ...], ...}, ...}

``messages`` is a list of turns; a turn is a list of consecutive messages by one
sender. Every participant with at least ``min_turns`` turns becomes one user
file in the project's JSONL format: one ``task`` per turn, whose output is the
turn (its messages, one per line) and whose input is the other side's turn just
before it (or an opening instruction for a conversation's first turn). So a
user's personal model is scored on how *they* reply. Each user gets a seeded
train/test split of their own turns; at most ``max_turns`` of their turns are
kept (the first ones in the file's order), which bounds a simulated device's
training time. ``users`` samples that many of the eligible participants, seeded.

``manifest.json`` records who is who (the sender key as the file gives it).
Errors name the file and a conversation's position (or the JSON parser's
line), never a message's text.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

REPLY = "Reply to this chat message:\n"
OPENING = "Start a chat conversation."


class ChatDataError(ValueError):
    """Malformed chat data: names the file and a conversation's position (or line), never a value."""


def read_turns(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Each sender's turns as (input, output) pairs, in the file's order."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError:
        raise ChatDataError(f"{path}: invalid_utf8") from None
    except json.JSONDecodeError as err:
        raise ChatDataError(f"{path}:{err.lineno}: invalid_json") from None
    except OSError:
        raise ChatDataError(f"{path}: unreadable_file") from None
    if not isinstance(data, dict) or not data:
        raise ChatDataError(f"{path}: not_an_object_of_conversations")
    turns: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for position, conversation in enumerate(data.values(), start=1):
        where = f"{path}: conversation {position}"
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not isinstance(messages, list):
            raise ChatDataError(f"{where}: missing_field:messages")
        previous = None
        for t, turn in enumerate(messages, start=1):
            if not isinstance(turn, list) or not turn:
                raise ChatDataError(f"{where}, turn {t}: bad_type:turn")
            senders, texts = set(), []
            for m in turn:
                if not isinstance(m, dict) or not isinstance(m.get("sender"), str) or not isinstance(m.get("text"), str):
                    raise ChatDataError(f"{where}, turn {t}: missing_field:sender_or_text")
                senders.add(m["sender"])
                if m["text"].strip():
                    texts.append(m["text"].strip())
            if len(senders) != 1:
                raise ChatDataError(f"{where}, turn {t}: mixed_senders")
            if not texts:
                continue  # a turn of empty messages says nothing to learn from
            text = "\n".join(texts)
            sender = senders.pop()
            if previous is None or previous[0] != sender:
                turns[sender].append((REPLY + previous[1] if previous else OPENING, text))
            previous = (sender, text)
    return dict(turns)


def write_users(turns: dict[str, list[tuple[str, str]]], out_dir: Path, *, min_turns: int = 10, max_turns: int = 100,
                users: int = 0, test_share: float = 0.2, seed: int = 0, source: str = "chats") -> dict:
    """One JSONL file per chosen participant under ``out_dir/users``, plus ``manifest.json``; returns the manifest."""
    if not 0 < test_share < 1:
        raise ValueError("test_share must lie in (0, 1)")
    if not 2 <= min_turns <= max_turns:
        raise ValueError("need 2 <= min_turns <= max_turns")
    eligible = sorted(s for s, pairs in turns.items() if len(pairs) >= min_turns)
    if users:
        eligible = sorted(random.Random(f"{seed}:users").sample(eligible, min(users, len(eligible))))
    out_dir = Path(out_dir)
    (out_dir / "users").mkdir(parents=True, exist_ok=True)
    listed = []
    for n, sender in enumerate(eligible):
        pairs = turns[sender][:max_turns]
        order = list(range(len(pairs)))
        random.Random(f"{seed}:{sender}").shuffle(order)
        test = set(order[: max(1, round(test_share * len(pairs)))])
        user_id = f"chatter_{n:04d}"
        records = [{"type": "task", "id": f"t{i:05d}", "split": "test" if i in test else "train", "input": source_text,
                    "output": reply} for i, (source_text, reply) in enumerate(pairs)]
        path = out_dir / "users" / f"{user_id}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        listed.append({"user_id": user_id, "file": f"users/{user_id}.jsonl", "holdout": False, "groups": {},
                       "sender": sender, "turns": len(pairs), "test": len(test)})
    manifest = {"source": source, "min_turns": min_turns, "max_turns": max_turns, "test_share": test_share,
                "seed": seed, "users": listed}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
