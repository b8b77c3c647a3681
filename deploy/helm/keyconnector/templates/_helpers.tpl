{{/* Names and labels, the usual Helm way. */}}
{{- define "keyconnector.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "keyconnector.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "keyconnector.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keyconnector.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "keyconnector.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "keyconnector.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "keyconnector.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "keyconnector.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "keyconnector.databaseSecret" -}}
{{- default (printf "%s-database" (include "keyconnector.fullname" .)) .Values.database.existingSecret }}
{{- end }}

{{- define "keyconnector.pfxSecret" -}}
{{- default (printf "%s-pfx" (include "keyconnector.fullname" .)) .Values.pfx.existingSecret }}
{{- end }}

{{/* The upstream setting that holds the connection string of database.provider. */}}
{{- define "keyconnector.connectionSetting" -}}
{{- $settings := dict "postgresql" "postgreSqlConnectionString" "mysql" "mySqlConnectionString" "sqlserver" "sqlServerConnectionString" }}
{{- $provider := lower .Values.database.provider }}
{{- if not (hasKey $settings $provider) }}
{{- fail (printf "database.provider '%s' cannot be shared by several replicas: use postgresql, mysql or sqlserver" .Values.database.provider) }}
{{- end }}
{{- get $settings $provider }}
{{- end }}

{{/* terminationGracePeriodSeconds: longer than the pre-stop pause, the drain and the workers' close. */}}
{{- define "keyconnector.gracePeriod" -}}
{{- $minimum := add (int .Values.shutdown.preStopSleepSeconds) (int (ceil .Values.shutdown.drainSeconds)) 5 }}
{{- if kindIs "invalid" .Values.shutdown.terminationGracePeriodSeconds }}
{{- add $minimum 5 }}
{{- else if le (int .Values.shutdown.terminationGracePeriodSeconds) $minimum }}
{{- fail (printf "shutdown.terminationGracePeriodSeconds (%v) must exceed preStopSleepSeconds + drainSeconds + 5 = %d, or Kubernetes kills requests that are still draining" .Values.shutdown.terminationGracePeriodSeconds $minimum) }}
{{- else }}
{{- int .Values.shutdown.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}
