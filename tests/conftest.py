import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import hypothesis

hypothesis.settings.register_profile(
    'ci', deadline=None, max_examples=30, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile('ci')
