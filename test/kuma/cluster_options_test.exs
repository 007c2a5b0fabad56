defmodule Kuma.ClusterOptionsTest do
  # The `:cluster` option of Kuma.start/1 is checked before anything starts: each bad value
  # gets its own sentence. (Runs without a distributed node: every check here comes first.)
  use ExUnit.Case, async: true

  alias Kuma.Cluster

  @seeds [:a@h, :b@h, :c@h]

  test "no :cluster option is a single-node store" do
    assert {:ok, nil} = Cluster.validate(nil, :s)
  end

  test "bad values are refused, each with its reason" do
    cases = [
      {:oops, "must be a keyword list"},
      {[seeds: @seeds, replicas: 3, colour: :red], {:unknown_option, {:cluster, :colour}}},
      {[seeds: []], ":seeds must be a non-empty list of node names"},
      {[seeds: [:a@h, :a@h]], ":seeds lists a node twice"},
      {[seeds: @seeds, replicas: 4], ":replicas must be an integer from 1 to the number of seeds (3)"},
      {[seeds: @seeds, start_timeout: 0], ":start_timeout must be a positive integer (ms)"},
      {[seeds: @seeds, snapshot_every: :often], ":snapshot_every must be a positive integer (log entries)"},
      {[seeds: @seeds, max_moves: 0], ":max_moves must be a positive integer (shard moves per round)"},
      {[seeds: @seeds, max_moves_per_node: -1],
       ":max_moves_per_node must be a positive integer (moves a node takes part in per round)"},
      {[seeds: @seeds, move_timeout: 1.5], ":move_timeout must be a positive integer (ms)"},
      {[seeds: @seeds, replace_after: nil], ":replace_after must be a positive integer (ms)"}
    ]

    for {opts, want} <- cases do
      got = Cluster.validate(opts, :s)

      case want do
        why when is_binary(why) -> assert got == {:error, {:invalid, :cluster, why}}, inspect(opts)
        reason -> assert got == {:error, reason}, inspect(opts)
      end
    end
  end

  test "good values pass every check up to the node's own name" do
    # This test VM is not distributed: the last check refuses, and only it.
    assert {:error, {:invalid, :cluster, why}} =
             Cluster.validate([seeds: @seeds, replicas: 3, max_moves: 8, replace_after: 5_000], :s)

    assert why =~ "not a distributed node"
  end
end
