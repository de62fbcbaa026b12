"""The presentation contexts resunet's Storage SCPs offer (resunet.pacs.dimse.storage_contexts): built
once, and deep-copied by pynetdicom for every association with a hand-written fast copy that must be
exactly what copy's generic deep copy makes."""

from __future__ import annotations

import copy

from pynetdicom.presentation import PresentationContext

from resunet.pacs.dimse import RETRIEVE_STORAGE, storage_contexts


def _generic_deepcopy(cx: PresentationContext) -> PresentationContext:
    """What copy.deepcopy makes of a context without the fast __deepcopy__ (its own class's way)."""
    plain = PresentationContext()
    plain.__dict__.update(copy.deepcopy(cx.__dict__))
    return plain


def test_the_fast_copy_equals_the_generic_deep_copy_and_shares_nothing_mutable():
    every = storage_contexts()
    assert storage_contexts() is every  # built once per process
    assert len(every) > 150 and every[-1].abstract_syntax == "1.2.840.10008.1.1"  # ends with Verification
    retrieve = storage_contexts(RETRIEVE_STORAGE)
    assert [cx.abstract_syntax for cx in retrieve[:-1]] == list(RETRIEVE_STORAGE)
    for original in (every[0], every[57], retrieve[3]):
        original.context_id = 7
        fast = copy.deepcopy([original])[0]
        assert isinstance(fast, PresentationContext) and fast is not original
        assert vars(fast) == vars(_generic_deepcopy(original))
        assert fast.transfer_syntax == original.transfer_syntax and len(fast.transfer_syntax) > 10
        fast.add_transfer_syntax("1.2.826.0.1.3680043.10.1.999")  # changes to the copy (in place) ...
        fast.context_id, fast.result = 9, 0
        assert "1.2.826.0.1.3680043.10.1.999" in fast.transfer_syntax
        assert "1.2.826.0.1.3680043.10.1.999" not in original.transfer_syntax  # ... stay there
        assert original.context_id == 7 and original.result is None
        original.context_id = None
