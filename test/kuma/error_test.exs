defmodule Kuma.ErrorTest do
  # Kuma.Error owns every reason's text: each reason its moduledoc lists has a sentence of
  # its own (not the inspect/1 fallback), and the exception carries the same text.
  use ExUnit.Case, async: true

  @reasons [
    {:invalid, :entity_id, "must be a binary"},
    {:too_large, :payload, 9_000_000, 8_388_608},
    {:unknown_option, :shard},
    :store_closed,
    {:no_store, :bank},
    {:already_started, :bank},
    {:data_dir_locked, "/d"},
    {:shard_count_mismatch, 16, 8},
    {:foreign_file, "/d/shards/000.kuma", "not ours"},
    {:missing_shard, "/d/shards/001.kuma"},
    {:unsupported_format, 9, 2},
    {:storage, "commit", "disk full"},
    {:panic, "boom"},
    :timeout,
    {:wrong_expected_seq, 2, 3},
    {:partial, [{:ok, 1}, {:error, :entity_erased}]},
    {:corrupt, 4, "bad back-pointer"},
    {:decode_failed, 4, :malformed},
    {:decode_failed, 4, :unknown_atom},
    {:tampered, 4, "hash mismatch"},
    {:tampered, [%{shard: 0, entity_id: "a", seq: 1, why: "x"}]},
    {:unknown_aggregate, Bank.Account},
    {:aggregate_mismatch, Bank.Account},
    {:no_handle, Bank.Ledger},
    {:user_code_crashed, :handle, "RuntimeError"},
    {:replay_failed, 3, "ArithmeticError"},
    {:init_failed, 0, "RuntimeError"},
    {:entity_down, :killed},
    {:entity_start_failed, :shutdown},
    :entity_erased,
    :key_missing,
    {:subject_erased, "alice"},
    :wrong_master_key,
    {:missing_master_key, "set KUMA_MASTER_KEY"},
    {:missing_keystore, "/d/keystore.kuma"},
    {:encryption_mismatch, :store_is_encrypted},
    {:encryption_mismatch, :store_is_plain},
    {:decrypt_failed, 5, "aead"},
    {:forget_unconfirmed, [self()]},
    {:unknown_projection, :revenue},
    {:sql, nil, "syntax error"},
    {:sql, 2, "no such table"},
    {:invalid_schema, Kuma.Test.Counter, {:sql, 0, "syntax error"}},
    {:foreign_projection, "/d/projections/x.sqlite", "store_id differs"},
    {:shard_diverged, 2, 100, 90},
    :nothing_to_skip,
    :projection_stopped,
    {:raised, "** (RuntimeError) boom"},
    {:bad_return, :handle_event, :oops},
    {:skipped, {:raised, "boom"}},
    {:outcome_unknown, :timeout},
    :not_leader,
    {:no_leader, :timeout},
    {:unreachable, :b@host, :noconnection},
    {:not_supported_in_cluster, :projections},
    {:cluster_mismatch, "the cluster has shards 16"},
    {:cluster_not_formed, "1 of 3 seeds reachable"},
    :not_a_cluster,
    :seed_cannot_leave,
    {:too_few_nodes, 2, 3},
    {:leave_unfinished, [1, 2]},
    {:ra_missing, "run bin/setup"},
    {:raft, :system_not_started},
    {:shard_member_failed, 3, :timeout},
    :replicated
  ]

  test "every documented reason has its own sentence" do
    {:docs_v1, _, _, _, %{"en" => moduledoc}, _, _} = Code.fetch_docs(Kuma.Error)

    for reason <- @reasons do
      text = Kuma.Error.format(reason)
      assert is_binary(text) and text != inspect(reason), "no sentence for #{inspect(reason)}"
      assert Kuma.format_error(reason) == text
      assert Exception.message(%Kuma.Error{reason: reason}) == text
      tag = if is_tuple(reason), do: elem(reason, 0), else: reason
      assert moduledoc =~ inspect(tag), "#{inspect(tag)} is not listed in Kuma.Error's moduledoc"
    end

    # Anything else still reads as something.
    assert Kuma.Error.format({:something, :new}) == "{:something, :new}"
  end
end
