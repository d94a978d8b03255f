-- Anomaly rules from seeds/anomaly_rules.csv: threshold and severity per rule, for one meter or all ('').
/* config
materialized: view
*/
with source as (
    select * from seed_anomaly_rules
),

final as (
    select
        rule::varchar as rule,
        meter_id::varchar as rule_meter_id,
        threshold::decimal(38, 9) as threshold,
        severity::varchar as severity,
        description::varchar as rule_description
    from source
)

select * from final
