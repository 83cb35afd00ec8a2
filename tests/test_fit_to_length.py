"""data.fit_to_length: the truncation rule, by hand on its edge cases."""

import pytest

from nanorlhf.data import fit_to_length

P, R = list(range(10)), list(range(100, 150))  # a 10-token prompt, a 50-token response


@pytest.mark.parametrize("prompt,response,max_len,min_response,want", [
    (P, R[:20], 30, 16, (P, R[:20], False)),  # exact fit: untouched
    (P, R, 30, 16, (P, R[:20], True)),  # the response is cut first
    # then the prompt, from the left
    (list(range(40)), R, 30, 16, (list(range(26, 40)), R[:16], True)),
    (P, R[:5], 12, 16, (P[3:], R[:5], True)),  # a response shorter than min_response is kept whole
    # max_len < min_response: the response's first max_len tokens only
    (P, R, 10, 16, ([], R[:10], True)),
    (P, R[:12], 10, 16, ([], R[:10], True)),
    ([], R, 10, 16, ([], R[:10], True)),  # empty prompt
    ([], R[:10], 10, 16, ([], R[:10], False)),  # empty prompt, exact fit
    (P, R, 1, 16, ([], R[:1], True)),
    (P, R, 26, 16, (P, R[:16], True)),  # exactly prompt + min_response
])
def test_fit_to_length(prompt, response, max_len, min_response, want):
    got = fit_to_length(prompt, response, max_len, min_response)
    assert got == want
    assert len(got[0]) + len(got[1]) <= max_len
