"""Folds and support scans reproduce the exact lists of the reference scripts
(docs/reference.md#folds-and-support-scans)."""

import pytest

from fsmis_monai.data.registry import CHAOS_MR_T2, CMR_BSSFP, SYNAPSE_CT, get_dataset, get_fold

# Written out by hand from docs/reference.md#folds-and-support-scans (not derived from the code under test).
CHAOS_FOLD_SCANS = {
    0: [1, 2, 3, 5, 8],
    1: [8, 10, 13, 15, 19],
    2: [19, 20, 21, 22, 31],
    3: [31, 32, 33, 34, 36],
    4: [36, 37, 38, 39, 1],
}
CHAOS_QNET_SUPPORT = {0: 3, 1: 13, 2: 21, 3: 33, 4: 37}
CHAOS_ADNET_SUPPORT = {0: 8, 1: 19, 2: 31, 3: 36, 4: 39}
CHAOS_ALP_SUPPORT = {0: 8, 1: 19, 2: 31, 3: 36, 4: 1}


@pytest.mark.parametrize("fold", range(5))
def test_chaos_folds_match_reference(fold):
    for family, supports in (("qnet", CHAOS_QNET_SUPPORT), ("adnet", CHAOS_ADNET_SUPPORT), ("alp", CHAOS_ALP_SUPPORT)):
        f = get_fold("chaos", fold, family)
        assert sorted(f.test_ids) == sorted(CHAOS_FOLD_SCANS[fold])
        assert f.support_id == supports[fold], family
        assert sorted(f.query_ids) == sorted(set(CHAOS_FOLD_SCANS[fold]) - {supports[fold]})
        assert len(f.train_ids) == 15
        assert not set(f.train_ids) & set(f.test_ids)


def test_alp_fold4_differs_from_adnet():
    # ALP fold 4 uses scan 1 as support while ADNet uses 39 and queries scan 1 (docs/reference.md#folds-and-support-scans).
    assert get_fold("chaos", 4, "alp").support_id == 1
    assert 1 in get_fold("chaos", 4, "adnet").query_ids


def test_cmr_and_sabs_fold_index_ranges():
    # CMR folds (indices): 0-7, 7-14, 14-21, 21-28, 28-34 + 0 over ids 1..35
    expected_cmr = {0: range(0, 8), 1: range(7, 15), 2: range(14, 22), 3: range(21, 29)}
    for fold, idx in expected_cmr.items():
        assert list(get_fold("cmr", fold, "adnet").test_ids) == [i + 1 for i in idx]
    assert list(get_fold("cmr", 4, "adnet").test_ids) == [1, 29, 30, 31, 32, 33, 34, 35]
    assert len(get_fold("cmr", 0).train_ids) == 27
    # SABS: 0-6, ..., 24-29 + 0 over ids 0..29; training 23 scans
    assert list(get_fold("sabs", 1, "adnet").test_ids) == list(range(6, 13))
    assert list(get_fold("sabs", 4, "adnet").test_ids) == [0, 24, 25, 26, 27, 28, 29]
    assert len(get_fold("sabs", 2).train_ids) == 23


def test_label_maps_and_names():
    assert dict(CMR_BSSFP.raw_label_map) == {0: 0, 200: 1, 500: 2, 600: 3}
    assert CMR_BSSFP.class_name(1) == "lv_myocardium" and CMR_BSSFP.class_id("RIGHT_VENTRICLE") == 3
    assert [CHAOS_MR_T2.class_name(c) for c in (1, 2, 3, 4)] == ["liver", "right_kidney", "left_kidney", "spleen"]
    assert SYNAPSE_CT.test_classes == (1, 2, 3, 6) and SYNAPSE_CT.class_name(6) == "liver"
    assert len(SYNAPSE_CT.classes) == 13
    assert CHAOS_MR_T2.supervoxel_min_size == 5000 and CMR_BSSFP.supervoxel_min_size == 1000


def test_bad_fold_and_dataset_are_clear_errors():
    with pytest.raises(ValueError, match="fold must be in 0..4"):
        get_fold("chaos", 5)
    with pytest.raises(KeyError, match="unknown dataset"):
        get_dataset("visceral")
    with pytest.raises(ValueError, match="unknown fold family"):
        get_fold("chaos", 0, "panet")


def test_no_dataset_is_own_data_with_classes_named_by_value():
    from fsmis_monai.data.registry import OWN_DATA

    assert get_dataset(None) is get_dataset("none") is get_dataset(" None ") is get_dataset("") is OWN_DATA
    assert OWN_DATA.class_id("255") == 255 and OWN_DATA.class_name(255) == "255"
    assert OWN_DATA.pseudolabel_folder("supervoxels") == "none_supervoxels_5000"  # the stated default size
    with pytest.raises(KeyError, match="a class is a label value"):
        OWN_DATA.class_id("liver")
    with pytest.raises(ValueError, match="no benchmark folds"):
        get_fold(OWN_DATA, 0, "qnet")
    assert not get_dataset("chaos").own_data
