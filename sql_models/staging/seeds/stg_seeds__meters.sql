-- Meters from seeds/meters.csv: which metrics make a meter, its kind, aggregation and units.
/* config
materialized: view
*/
with source as (
    select * from seed_meters
),

final as (
    select
        meter_id::varchar as meter_id,
        string_split(metrics, ' ') as metric_names,
        kind::varchar as kind,
        aggregation::varchar as aggregation,
        unit::varchar as unit,
        billing_unit::varchar as billing_unit,
        customer_label::varchar as customer_label,
        dimension_label::varchar as dimension_label,
        stripe_event_name::varchar as stripe_event_name,
        description::varchar as meter_description
    from source
)

select * from final
