"""Reference walks over a token row that the capture tests compare the library's decision positions with."""


def body_ends(x, g, opn, close, braces) -> list[int]:
    """Generated positions whose token brings an open call's brace depth back to 0 (a plain walk over the row)."""
    out, in_call, depth = [], False, 0
    for t, tok in enumerate(x):
        if g[t] and (t == 0 or not g[t - 1]):
            in_call = False  # a new generated turn
        if tok == opn and g[t]:
            in_call, depth = True, 0
            continue
        if tok == close:
            in_call = False
            continue
        o, c = braces.get(tok, (0, 0))
        depth += o - c
        if in_call and g[t] and c > 0 and depth == 0:
            out.append(t)
    return out
