-- Raw usage events of the partition being computed and the day before it (gauge carry-in), renamed and cast.
/* config
materialized: view
*/
with source as (
    select * from raw_events
),

final as (
    select
        event_id::varchar as event_id,
        ts::bigint as ts_ms,
        customer_key::varchar as customer_key,
        meter_id::varchar as meter_id,
        coalesce(dimension, '')::varchar as dimension,
        kind::varchar as kind,
        quantity::decimal(38, 9) as quantity,
        hold_ms::bigint as hold_ms,
        attributes::map (varchar, varchar) as attributes
    from source
)

select * from final
