from hypothesis import settings

settings.register_profile("ci", deadline=None, max_examples=150, print_blob=True)
settings.load_profile("ci")
