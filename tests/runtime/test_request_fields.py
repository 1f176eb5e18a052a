"""flow.check_request names the EditRequest field at fault (param) and a code; its CLI-worded messages are kept."""
import math

import pytest

from kontext_trt.core.errors import KontextError
from kontext_trt.runtime.flow import EditRequest, check_request


@pytest.mark.parametrize("change,param,code,message", [
    ({"prompts": []}, "prompt", "missing_argument", 'no prompt given: pass --prompt "what to change"'),
    ({"steps": 0}, "steps", "out_of_range", "steps must be at least 1, got 0"),
    ({"width": 64}, "height", "missing_argument", "give both --width and --height, or neither"),
    ({"height": 64}, "width", "missing_argument", "give both --width and --height, or neither"),
    ({"width": 100, "height": 64}, "width", "invalid_value", "width 100 is not a multiple of 16"),
    ({"width": 64, "height": 4096}, "height", "out_of_range", "height 4096 is out of range"),
    ({"guidance": math.nan}, "guidance", "invalid_value", "--guidance nan is not a finite number"),
    ({"true_cfg": math.inf, "negative_prompt": "blur"}, "true_cfg", "invalid_value", "--true-cfg inf is not a finite"),
    ({"true_cfg": 7.0}, "true_cfg", "invalid_value", "--true-cfg 7.0 needs a --negative-prompt to push away from"),
    ({"seed": -3}, "seed", "out_of_range", "--seed -3 is outside 0..18446744073709551615"),
    ({"prompts": ["caf\udce9"]}, "prompt", "invalid_value", "--prompt is not valid UTF-8 text (byte 0xe9)"),
    ({"negative_prompt": "\udcff", "true_cfg": 2.0}, "negative_prompt", "invalid_value", "--negative-prompt is not"),
])
def test_check_request_names_the_field(change, param, code, message):
    with pytest.raises(KontextError) as info:
        check_request(EditRequest(**{"prompts": ["add a moon"], **change}))
    assert (info.value.param, info.value.code) == (param, code)
    assert message in info.value.message and "\n" not in info.value.message
