defmodule Kuma.Envelope do
  @moduledoc """
  A stored event with everything Kuma knows about it.

  * `entity_id` - the entity's id (binary)
  * `seq` - its sequence in the entity's stream: 1, 2, 3, ... without gaps
  * `position` - its global position in its shard, assigned in commit order
  * `shard` - the shard that stores the entity
  * `type` - the event type (see `Kuma.Codec`)
  * `timestamp` - commit time in microseconds since the Unix epoch; never decreases within an
    entity (use `DateTime.from_unix!(ts, :microsecond)`)
  * `metadata` - the map given with the append (`%{}` if none)
  * `data` - the event term as appended
  * `hash` - the 32-byte BLAKE3 chain hash (see docs/storage-format.md)
  * `global` - its position in the store-wide order (`Kuma.read_all/2`), when read in that
    order; `nil` otherwise
  """

  @enforce_keys [:entity_id, :seq, :position, :shard, :type, :timestamp, :metadata, :data, :hash]
  defstruct @enforce_keys ++ [global: nil]

  @type t :: %__MODULE__{
          entity_id: binary(),
          seq: pos_integer(),
          position: pos_integer(),
          shard: non_neg_integer(),
          type: String.t(),
          timestamp: integer(),
          metadata: map(),
          data: term(),
          hash: <<_::256>>,
          global: pos_integer() | nil
        }
end
